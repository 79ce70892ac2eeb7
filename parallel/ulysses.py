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
         ) -> torch.Tensor:
    """One all_to_all_single: ``parts[r]`` (several tensors) go to rank r, each copied once straight into its
    region of the send buffer (no contiguous() + cat double copy). Returns the receive buffer: per source rank r,
    the tensors of ``out_shapes[r]`` back to back."""
    in_splits = [sum(p.numel() for p in ps) for ps in parts]
    send = parts[0][0].new_empty(sum(in_splits))
    o = 0
    for ps in parts:
        for p in ps:
            send[o:o + p.numel()].view(p.shape).copy_(p)
            o += p.numel()
    out_splits = [sum(int(torch.Size(s).numel()) for s in ss) for ss in out_shapes]
    recv = send.new_empty(sum(out_splits))
    guarded(what, dist.all_to_all_single, recv, send, out_splits, in_splits, group=group)
    return recv


def scatter_heads(xs: list[torch.Tensor], ranges: list[list[tuple[int, int]]], me: int, group, what: str
                  ) -> list[torch.Tensor]:
    """Sequence -> heads: each (chunk, H_i, D) of local rows, all heads -> (degree*chunk, my heads of
    ``ranges[i]``, D): rows of every rank, in rank order. The first tensor (q, the large one) has an exchange of its
    own, whose receive buffer already is that layout (no unpacking copy); the others (k and v) share one exchange
    and are unpacked. Pure data movement: the values, hence every bit downstream, are the inputs'."""
    deg = len(ranges[0])
    chunk, d = xs[0].shape[0], xs[0].shape[2]

    def exchange(ts, rs):
        parts = [[x[:, r[dst][0]:r[dst][1]] for x, r in zip(ts, rs)] for dst in range(deg)]
        shapes = [[(chunk, r[me][1] - r[me][0], d) for r in rs]] * deg
        return _a2a(parts, shapes, group, what), [r[me][1] - r[me][0] for r in rs]

    recv, (hq,) = exchange(xs[:1], ranges[:1])
    out = [recv.view(deg * chunk, hq, d)]
    if len(xs) > 1:
        recv, heads = exchange(xs[1:], ranges[1:])
        per_src = recv.view(deg, -1)
        o = 0
        for h in heads:
            n = chunk * h * d
            out.append(per_src[:, o:o + n].reshape(deg * chunk, h, d))
            o += n
    return out


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
