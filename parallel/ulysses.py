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


def _exchange(send: torch.Tensor, in_splits: list[int], out_splits: list[int], group, what: str) -> torch.Tensor:
    """One all_to_all_single of the flat ``send`` (``in_splits[r]`` elements to rank r); returns the flat receive
    buffer (``out_splits[r]`` elements from rank r, in rank order)."""
    recv = send.new_empty(sum(out_splits))
    guarded(what, dist.all_to_all_single, recv, send, out_splits, in_splits, group=group)
    return recv


def _send_heads(xs: list[torch.Tensor], ranges: list[list[tuple[int, int]]], me: int, group, what: str
                ) -> tuple[torch.Tensor, list[int]]:
    """Sequence -> heads for tensors ``xs`` (chunk, H_i, D) in one exchange: rank r gets each tensor's heads
    ``ranges[i][r]``, every part copied once straight into its region of the send buffer (no contiguous() + cat
    double copy). Returns the receive buffer -- per source rank, this rank's heads of each tensor back to back --
    and this rank's head count per tensor."""
    deg = len(ranges[0])
    parts = [[x[:, r[dst][0]:r[dst][1]] for x, r in zip(xs, ranges)] for dst in range(deg)]
    in_splits = [sum(p.numel() for p in ps) for ps in parts]
    send = xs[0].new_empty(sum(in_splits))
    o = 0
    for ps in parts:
        for p in ps:
            send[o:o + p.numel()].view(p.shape).copy_(p)
            o += p.numel()
    heads = [r[me][1] - r[me][0] for r in ranges]
    per_src = sum(x.shape[0] * h * x.shape[2] for x, h in zip(xs, heads))
    return _exchange(send, in_splits, [per_src] * deg, group, what), heads


def scatter_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_ranges: list[tuple[int, int]],
                  kv_ranges: list[tuple[int, int]], me: int, group, what: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sequence -> heads for a layer's q, k, v, each (chunk, H, D) of local rows, all heads -> (degree*chunk, my
    heads, D): rows of every rank, in rank order. q (the large one) has an exchange of its own, whose receive
    buffer already is that layout (no unpacking copy); k and v share a second one and are unpacked. Pure data
    movement: the values, hence every bit downstream, are the inputs'."""
    deg, (chunk, _, d) = len(q_ranges), q.shape
    recv, (hq,) = _send_heads([q], [q_ranges], me, group, what)
    recv_kv, (hk, _) = _send_heads([k, v], [kv_ranges, kv_ranges], me, group, what)
    per_src, n = recv_kv.view(deg, -1), chunk * hk * d
    return (recv.view(deg * chunk, hq, d), per_src[:, :n].reshape(deg * chunk, hk, d),
            per_src[:, n:].reshape(deg * chunk, hk, d))


def gather_heads(y: torch.Tensor, ranges: list[tuple[int, int]], me: int, group, what: str) -> torch.Tensor:
    """Inverse of scatter_heads for the attention output: (degree*chunk, my heads, D), rows in rank order ->
    (chunk, all heads, D). ``y``'s row blocks already are the per-destination parts, so it is sent as it is (no
    packing copy); the received heads are interleaved per row by one cat."""
    n, _, d = y.shape
    deg = len(ranges)
    chunk = n // deg
    y = y.contiguous()
    out_splits = [chunk * (b - a) * d for a, b in ranges]
    recv = _exchange(y.reshape(-1), [y.numel() // deg] * deg, out_splits, group, what)
    return torch.cat([r.view(chunk, b - a, d) for r, (a, b) in zip(recv.split(out_splits), ranges)], dim=1)
