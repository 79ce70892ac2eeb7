"""MoT-routed linear layers: one entry point for every projection of the BAGEL layer.

``routed_linear(x, routing, weight, bias)`` computes ``x[r] @ weight[e(r)].T + bias[e(r)]`` where ``e(r)`` is the
expert of row ``r`` (0 = understanding, 1 = generation). Weights are stacked per expert, ``(E, P, N, K)``: P = 1 for
a plain projection (QKV fused along N), P = 2 for SwiGLU (gate, up), whose output is ``silu(gate) * up``.
``residual`` adds the (rounded) projection to it, as the layer's ``x + o_proj(a)``.

Backends (``KernelOptions``; this function is the one place that chooses): CUDA -> in "exact" mode the
batch-invariant routed GEMM: on Hopper with 16-bit inputs the warp-specialized Gluon kernel (``routed_gemm_gluon``;
row tiles start at each routing segment's first row), else the Triton kernel (``routed_gemm_triton``) — the two
give the same bits (GPU test), and ``backend="triton"`` forces the Triton one; in "fast" mode one cuBLAS GEMM per expert (``routed_gemm_cublas``) where cuBLAS wins
(``fast_mode_uses_cublas``), the Gluon kernel elsewhere. CPU -> the plain-torch reference below (row-padded GEMMs
per segment), or the Triton interpreter when asked for ``backend="triton"``.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ._dispatch import resolve_backend, use_gluon
from .linear import ExpertSegments, device_expert_ids, invariant_linear_reference
from .options import KernelOptions, resolve_options
from .routed_gemm_cublas import routed_gemm_cublas
from .routed_gemm_gluon import routed_gemm_gluon
from .routed_gemm_triton import SMALL_BATCH_ROWS, routed_gemm_small_batch_triton, routed_gemm_triton

Activation = Literal["swiglu"] | None


def _check(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor, bias: torch.Tensor | None,
           activation: Activation, residual: torch.Tensor | None, expert_ids: torch.Tensor | None) -> None:
    if weight.dim() != 4:
        raise ValueError(f"routed_linear: weight must be (experts, parts, N, K), got shape {tuple(weight.shape)}")
    e, p, n, k = weight.shape
    if p != (2 if activation == "swiglu" else 1):
        raise ValueError(f"routed_linear: activation {activation!r} needs {2 if activation else 1} weight parts, got {p}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"routed_linear: input must be (rows, {k}), got shape {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        raise TypeError(f"routed_linear: input dtype {x.dtype} != weight dtype {weight.dtype}")
    if bias is not None and tuple(bias.shape) != (e, p, n):
        raise ValueError(f"routed_linear: bias must be {(e, p, n)}, got {tuple(bias.shape)}")
    if routing is not None:
        if routing.num_tokens != x.shape[0]:
            raise ValueError(f"routed_linear: routing covers {routing.num_tokens} rows but the input has {x.shape[0]}")
        if e < 2 and any(g for _, _, g in routing.segments):
            raise ValueError("routed_linear: routing has generation rows but the weight has one expert")
    elif e != 1 and expert_ids is None:
        raise ValueError(f"routed_linear: a weight with {e} experts needs a routing")
    if residual is not None and tuple(residual.shape) != (x.shape[0], n):
        raise ValueError(f"routed_linear: residual must be {(x.shape[0], n)}, got {tuple(residual.shape)}")


def routed_linear_reference(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor,
                            bias: torch.Tensor | None, activation: Activation = None,
                            residual: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: one row-padded GEMM per (contiguous segment, part)."""
    lin = invariant_linear_reference  # row-padded, so a row's bits do not depend on its segment's length
    segments = routing.segments if routing is not None else ((0, x.shape[0], False),)

    def project(t: torch.Tensor, e: int) -> torch.Tensor:
        b = (lambda j: None) if bias is None else (lambda j: bias[e, j])
        if activation == "swiglu":
            return F.silu(lin(t, weight[e, 0], b(0))) * lin(t, weight[e, 1], b(1))
        return lin(t, weight[e, 0], b(0))

    parts = [project(x[s:t], int(g)) for s, t, g in segments if t > s]
    y = parts[0] if len(parts) == 1 else (torch.cat(parts) if parts else x.new_empty(0, weight.shape[2]))
    return y if residual is None else residual + y


def fast_mode_uses_cublas(activation: Activation, has_residual: bool, n: int, k: int, gluon: bool) -> bool:
    """Fast mode calls cuBLAS where it wins, and keeps the fused Gluon kernel where cuBLAS's epilogue costs more
    than routing does: SwiGLU (cuBLAS needs a second, eager pass for the activation, which the fused kernel does in
    its epilogue) and a residual on a short K loop (o_proj, K = N: reading the M x N residual is a large share of the
    work, and cuBLAS with beta = 1 loses more to it than the fused epilogue). A long K loop (down, K = 5.3 N) hides
    the residual read, so cuBLAS wins there. Without Gluon (not Hopper) cuBLAS always wins. The measurements behind
    this choice: benchmarks/RESULTS.md (routed MoT GEMM)."""
    if not gluon:
        return True
    return activation != "swiglu" and not (has_residual and k <= n)


def routed_linear(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor,
                  bias: torch.Tensor | None = None, *, activation: Activation = None,
                  residual: torch.Tensor | None = None, expert_ids: torch.Tensor | None = None,
                  options: KernelOptions | None = None, small_batch: bool = False) -> torch.Tensor:
    """Expert-routed ``act(x @ W[e].T + b[e]) (+ residual)`` for rows routed by ``routing``.

    ``expert_ids`` (int32, one per row, on x's device) lets a caller build the device-side routing once per forward
    (``routing.expert_ids(device)``); it is built here otherwise. ``routing=None`` means one expert for all rows.

    ``small_batch=True`` (AR decode: at most 16 rows) runs a kernel split over N only, which streams the weights
    from every SM. It is an explicit choice of the caller, never made from M: its rows are batch-invariant among
    themselves but differ in the last bits from the large kernel's, so use it only on paths whose rows are never
    compared against large-batch rows (text decoding; never the denoiser). More than 16 rows use the large kernel."""
    _check(x, routing, weight, bias, activation, residual, expert_ids)
    opts = resolve_options(options)
    if resolve_backend(x.device, opts) == "reference":
        return routed_linear_reference(x, routing, weight, bias, activation, residual)
    gluon = use_gluon(x.device, x.dtype, opts)
    if opts.mode == "fast" and x.device.type == "cuda" and fast_mode_uses_cublas(
            activation, residual is not None, weight.shape[2], weight.shape[3], gluon):
        return routed_gemm_cublas(x, routing, weight, bias, activation == "swiglu", residual)
    expert_ids = device_expert_ids(routing, expert_ids, weight.shape[0], x.device)
    if residual is not None:
        residual = residual.contiguous()
    weight = weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if small_batch and x.shape[0] <= SMALL_BATCH_ROWS:
        return routed_gemm_small_batch_triton(x, weight, bias, expert_ids, activation == "swiglu", residual)
    if gluon:
        return routed_gemm_gluon(x.contiguous(), weight, bias, expert_ids, activation == "swiglu", residual,
                                 segments=None if routing is None else routing.segments)
    return routed_gemm_triton(x, weight, bias, expert_ids, activation == "swiglu", residual)


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                     options: KernelOptions | None = None, small_batch: bool = False) -> torch.Tensor:
    """A plain (one-expert) batch-invariant linear over any leading shape: ``x @ weight.T + bias``
    (``small_batch``: see ``routed_linear``)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    lead = x.shape[:-1]
    n, k = weight.shape
    y = routed_linear(x.reshape(-1, k), None, weight.view(1, 1, n, k), None if bias is None else bias.view(1, 1, n),
                      options=options, small_batch=small_batch)
    return y.reshape(*lead, n)
