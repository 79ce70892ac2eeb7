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


def _a2a(parts: list[list[torch.Tensor]], out_shapes: list[list[tuple[int, ...]]], group, what: str
         ) -> list[list[torch.Tensor]]:
    """One all_to_all_single: ``parts[r]`` (several tensors) go to rank r; returns, per source rank, the tensors it
    sent here, viewed in ``out_shapes[r]``."""
    send = torch.cat([p.contiguous().reshape(-1) for ps in parts for p in ps])
    in_splits = [sum(p.numel() for p in ps) for ps in parts]
    sizes = [[int(torch.Size(s).numel()) for s in ss] for ss in out_shapes]
    out_splits = [sum(ns) for ns in sizes]
    recv = send.new_empty(sum(out_splits))
    guarded(what, dist.all_to_all_single, recv, send, out_splits, in_splits, group=group)
    got = []
    for r, ns, ss in zip(recv.split(out_splits), sizes, out_shapes):
        got.append([t.view(s) for t, s in zip(r.split(ns), ss)])
    return got


def scatter_heads(xs: list[torch.Tensor], ranges: list[list[tuple[int, int]]], me: int, group, what: str
                  ) -> list[torch.Tensor]:
    """Sequence -> heads for several tensors in ONE all-to-all (q, k and v of a layer pay one collective's latency,
    not three): each (chunk, H_i, D) of local rows, all heads -> (degree*chunk, my heads of ``ranges[i]``, D): rows
    of every rank, in rank order. Pure data movement: the values, hence every bit downstream, are those of three
    separate exchanges."""
    deg = len(ranges[0])
    parts = [[x[:, r[dst][0]:r[dst][1]] for x, r in zip(xs, ranges)] for dst in range(deg)]
    shapes = [[(x.shape[0], r[me][1] - r[me][0], x.shape[2]) for x, r in zip(xs, ranges)]] * deg
    got = _a2a(parts, shapes, group, what)
    return [torch.cat([g[i] for g in got], dim=0) for i in range(len(xs))]


def gather_heads(y: torch.Tensor, ranges: list[tuple[int, int]], me: int, group, what: str) -> torch.Tensor:
    """Inverse of scatter_heads for the attention output: (degree*chunk, my heads, D), rows in rank order ->
    (chunk, all heads, D). ``y``'s row blocks already are the per-destination parts, so it is sent as it is (no
    packing copy); the received heads are interleaved per row by one cat."""
    n, _, d = y.shape
    deg = len(ranges)
    chunk = n // deg
    y = y.contiguous()
    out_splits = [chunk * (b - a) * d for a, b in ranges]
    recv = y.new_empty(sum(out_splits))
    guarded(what, dist.all_to_all_single, recv, y.reshape(-1), out_splits, [y.numel() // deg] * deg, group=group)
    return torch.cat([r.view(chunk, b - a, d) for r, (a, b) in zip(recv.split(out_splits), ranges)], dim=1)
