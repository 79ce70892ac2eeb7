"""The "fast" mode's routed projection: one cuBLAS call per expert, writing straight into the output rows.

Why per expert rather than per segment: BAGEL's img2img prefill routes text / image / text (40 und + 4098 gen + 60
und rows). Per segment, each short text run is its own GEMM that streams the whole und weight from HBM for a few
dozen rows (gate/up: 271 MB per call). Here the rows of an expert that sit in several runs are gathered once (a copy
of a few hundred rows), so every weight is read by one GEMM; an expert with one run is a view, and its GEMM writes
into its rows of the output without a copy.

Not batch-invariant: cuBLAS picks its kernel from M, so a row's bits depend on how many rows share its call (see
``_dispatch.resolve_mode``). Plain torch on any device; ``routed_linear`` calls it in "fast" mode on CUDA where
cuBLAS wins (``routed_linear.fast_mode_uses_cublas``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import ExpertSegments


def expert_runs(routing: ExpertSegments | None, num_rows: int) -> dict[int, list[tuple[int, int]]]:
    """Row runs ``[(start, end), ...]`` per expert (0 = und, 1 = gen), in row order; no routing = all expert 0."""
    segments = routing.segments if routing is not None else ((0, num_rows, False),)
    runs: dict[int, list[tuple[int, int]]] = {}
    for s, t, g in segments:
        if t > s:
            runs.setdefault(int(g), []).append((s, t))
    return runs


def _project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, swiglu: bool,
             residual: torch.Tensor | None, out: torch.Tensor) -> None:
    """``out = act(x @ weight.T + bias) (+ residual)`` for one expert; weight (P, N, K), bias (P, N) or None."""
    p, n, k = weight.shape
    if swiglu:
        # One GEMM over gate and up (the parts are stacked, so (2, N, K) is a (2N, K) matrix), then the activation.
        h = F.linear(x, weight.view(p * n, k), None if bias is None else bias.view(p * n))
        torch.mul(F.silu(h[:, :n]), h[:, n:], out=out)
        if residual is not None:
            out += residual
        return
    w = weight[0]
    if residual is not None and bias is None:
        # The residual as cuBLAS's C operand (beta = 1): added in fp32 before the one rounding.
        torch.addmm(residual, x, w.T, out=out)
    elif bias is not None:
        torch.addmm(bias[0], x, w.T, out=out)
        if residual is not None:
            out += residual
    else:
        torch.mm(x, w.T, out=out)


def routed_gemm_cublas(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor,
                         bias: torch.Tensor | None = None, swiglu: bool = False,
                         residual: torch.Tensor | None = None) -> torch.Tensor:
    """``routed_linear``'s contract (x (M, K); weight (E, P, N, K); bias (E, P, N) or None) with one GEMM per expert.
    Rows of an expert in one contiguous run are computed in place in ``out``; rows in several runs are gathered,
    computed, and scattered back."""
    m = x.shape[0]
    n = weight.shape[2]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    for e, runs in expert_runs(routing, m).items():
        b = None if bias is None else bias[e]
        if len(runs) == 1:
            s, t = runs[0]
            _project(x[s:t], weight[e], b, swiglu, None if residual is None else residual[s:t], out[s:t])
            continue
        xs = torch.cat([x[s:t] for s, t in runs])
        rs = None if residual is None else torch.cat([residual[s:t] for s, t in runs])
        ys = torch.empty(xs.shape[0], n, dtype=x.dtype, device=x.device)
        _project(xs, weight[e], b, swiglu, rs, ys)
        i = 0
        for s, t in runs:
            out[s:t].copy_(ys[i:i + t - s])
            i += t - s
    return out
