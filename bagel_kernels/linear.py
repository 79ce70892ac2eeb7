"""Batch-invariant linear layers and Mixture-of-Transformers routing (plain-torch reference path).

Why padding: CPU BLAS (MKL) switches to a different kernel for very small M (in fp32: M <= 3), which
changes the bits of a row depending on how many rows share the launch. Padding the rows of every GEMM to a multiple
of ``ROW_TILE`` keeps each row on one code path, so a row's result never depends on M — the exactness contract.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

ROW_TILE = 16


def invariant_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` whose rows do not depend on the number of rows in the call (CPU BLAS, padded rows)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight expects {weight.shape[1]}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    m = x2.shape[0]
    pad = max(ROW_TILE, -(-m // ROW_TILE) * ROW_TILE) - m
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])], dim=0)
    y = F.linear(x2.contiguous(), weight, bias)[:m]
    return y.reshape(*lead, weight.shape[0])


@dataclass(frozen=True)
class ExpertSegments:
    """Routing of a packed token sequence to the two MoT experts, as contiguous host-side segments.

    ``segments`` is a tuple of ``(start, end, is_gen)``; it is derived from the sequence *layout* (which the host
    built), never from tensor values, so routing costs no device-to-host synchronization.
    """

    segments: tuple[tuple[int, int, bool], ...]

    @staticmethod
    def uniform(n: int, is_gen: bool) -> "ExpertSegments":
        return ExpertSegments(((0, n, is_gen),) if n else ())

    @staticmethod
    def from_flags(flags: list[bool]) -> "ExpertSegments":
        """Run-length encode host booleans (one per token) into segments."""
        segs: list[tuple[int, int, bool]] = []
        for i, g in enumerate(flags):
            if segs and segs[-1][2] == g and segs[-1][1] == i:
                segs[-1] = (segs[-1][0], i + 1, g)
            else:
                segs.append((i, i + 1, g))
        return ExpertSegments(tuple(segs))

    @property
    def num_tokens(self) -> int:
        return self.segments[-1][1] if self.segments else 0

    def slice(self, start: int, end: int) -> "ExpertSegments":
        """Routing of rows [start, end) re-based to 0 (used for the token split of sequence parallelism)."""
        out = []
        for s, e, g in self.segments:
            a, b = max(s, start), min(e, end)
            if a < b:
                out.append((a - start, b - start, g))
        return ExpertSegments(tuple(out))

    def gen_mask(self, device: torch.device | str = "cpu") -> torch.Tensor:
        return self.expert_ids(device).bool()

    def expert_ids(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Expert index per row (0 = understanding, 1 = generation) as int32 on ``device``, built by fills of a
        zeroed tensor — one small kernel per generation segment, no host-to-device copy and no synchronization."""
        ids = torch.zeros(self.num_tokens, dtype=torch.int32, device=device)
        for s, e, g in self.segments:
            if g:
                ids[s:e] = 1
        return ids


def device_expert_ids(routing: ExpertSegments | None, expert_ids: torch.Tensor | None, num_experts: int,
                      device: torch.device) -> torch.Tensor | None:
    """What a routed Triton kernel reads: the caller's per-row ids, else ids built from ``routing``; None when the
    weights have one expert (the kernel then skips routing)."""
    if num_experts == 1:
        return None
    if expert_ids is None and routing is not None:
        expert_ids = routing.expert_ids(device)
    return expert_ids


def routed_apply(x: torch.Tensor, routing: ExpertSegments, fn_und, fn_gen) -> torch.Tensor:
    """Apply ``fn_und`` / ``fn_gen`` to each contiguous segment of rows and reassemble in order."""
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"routing covers {routing.num_tokens} tokens but the input has {x.shape[0]} rows")
    parts = [(fn_gen if g else fn_und)(x[s:e]) for s, e, g in routing.segments]
    if len(parts) == 1:
        return parts[0]
    return torch.cat(parts, dim=0)
