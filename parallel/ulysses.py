"""Ulysses: all-to-all sequence <-> heads, ANY degree.

Query heads are split into contiguous, possibly uneven groups (degree 3 or 8 over 28 heads); each rank receives
the KV heads its query heads read, so a degree above the KV-head count replicates KV heads. A rank then holds whole
heads over the whole (super-)sequence and runs exactly the per-head work of the single-device run.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import guarded


def head_split(num_heads: int, degree: int) -> list[tuple[int, int]]:
    """Contiguous query-head ranges per Ulysses rank; the first num_heads % degree ranks get one extra head."""
    if degree > num_heads:
        raise ValueError(f"ulysses degree {degree} exceeds {num_heads} query heads")
    base, extra = divmod(num_heads, degree)
    out, start = [], 0
    for i in range(degree):
        n = base + (1 if i < extra else 0)
        out.append((start, start + n))
        start += n
    return out


def kv_heads_for(q_range: tuple[int, int], group: int) -> tuple[int, int]:
    """KV heads [a, b) read by query heads [h0, h1) under GQA group size ``group``."""
    h0, h1 = q_range
    return h0 // group, (h1 - 1) // group + 1


def _a2a(x_parts: list[torch.Tensor], out_shapes: list[tuple[int, ...]], group, what: str) -> list[torch.Tensor]:
    send = torch.cat([p.contiguous().reshape(-1) for p in x_parts])
    in_splits = [p.numel() for p in x_parts]
    out_splits = [int(torch.Size(s).numel()) for s in out_shapes]
    recv = send.new_empty(sum(out_splits))
    guarded(what, dist.all_to_all_single, recv, send, out_splits, in_splits, group=group)
    return [r.view(s) for r, s in zip(recv.split(out_splits), out_shapes)]


def scatter_heads(x: torch.Tensor, ranges: list[tuple[int, int]], me: int, group, what: str) -> torch.Tensor:
    """(chunk, H, D) local rows, all heads -> (degree*chunk, my heads, D): rows of every rank, my head range."""
    chunk, _, d = x.shape
    parts = [x[:, a:b] for a, b in ranges]
    a, b = ranges[me]
    got = _a2a(parts, [(chunk, b - a, d)] * len(ranges), group, what)
    return torch.cat(got, dim=0)


def gather_heads(y: torch.Tensor, ranges: list[tuple[int, int]], me: int, group, what: str) -> torch.Tensor:
    """Inverse of scatter_heads for the attention output: (degree*chunk, my heads, D) -> (chunk, all heads, D)."""
    n, _, d = y.shape
    deg = len(ranges)
    chunk = n // deg
    parts = [y[i * chunk:(i + 1) * chunk] for i in range(deg)]
    got = _a2a(parts, [(chunk, b - a, d) for a, b in ranges], group, what)
    return torch.cat(got, dim=1)
