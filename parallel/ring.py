"""Ring attention over the ring group for the packed step (``bagel_model.engine.layout``): each ring rank holds one
super-chunk of the packed rows (its queries, its K/V).

exact: every chunk reaches every ring rank by a broadcast from its owner (all issued up front, each waited for in
order); the rank then walks every job's keys in that job's canonical order — context, then its own rows — exactly
as one device does, so the output is bit-identical. (A job's own rows are spread over the chunks in packed order, so
the per-chunk resumable walk of the unpacked layout cannot keep the canonical block boundaries; the broadcast volume
per link is that of a classic ring either way.)
fast: classic rotation with async P2P; each step attends the jobs' keys that live in the visiting chunk and the
partial results are merged by log-sum-exp — tolerance-exact only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_kernels import ContiguousKV, KernelOptions, merge_attention_partials
from bagel_model.engine.layout import JobRows, PackedLayout, QueryPlan, packed_attention

from .mesh import guarded


def ring_attention_exact(q, k, v, ctx: ContiguousKV | None, ring_ranks: list[int], ring_idx: int, group,
                         plan: QueryPlan, key_rows: JobRows, cache: dict, gqa_group: int,
                         q_head_offset: int, options: KernelOptions | None = None) -> torch.Tensor:
    R = len(ring_ranks)
    kv = torch.stack([k, v]).contiguous()
    bufs, works = [], []
    for c in range(R):
        buf = kv if c == ring_idx else torch.empty_like(kv)
        works.append(guarded(f"ring broadcast chunk {c}", dist.broadcast, buf, src=ring_ranks[c], group=group,
                             async_op=True))
        bufs.append(buf)
    for c in range(R):
        guarded(f"ring wait chunk {c}", works[c].wait)
    keys = (torch.cat([b[0] for b in bufs]), torch.cat([b[1] for b in bufs]))
    return packed_attention(q, keys, key_rows, ctx, plan, cache, gqa_group, q_head_offset, options=options)


def ring_attention_fast(q, k, v, ctx: ContiguousKV | None, ring_ranks: list[int], ring_idx: int, group,
                        plan: QueryPlan, chunk_rows: list[JobRows], cache: dict, gqa_group: int,
                        q_head_offset: int, options: KernelOptions | None = None) -> torch.Tensor:
    """``chunk_rows[c]``: the rows of chunk c grouped per job (relative to the chunk's start)."""
    R = len(ring_ranks)
    cur = torch.stack([k, v]).contiguous()
    out = lse = None
    for s in range(R):
        src_chunk = (ring_idx - s) % R
        reqs = []
        if s < R - 1:
            nxt = torch.empty_like(cur)
            send_to, recv_from = ring_ranks[(ring_idx + 1) % R], ring_ranks[(ring_idx - 1) % R]
            ops = [dist.P2POp(dist.isend, cur, send_to, group=group), dist.P2POp(dist.irecv, nxt, recv_from, group=group)]
            reqs = guarded(f"ring p2p step {s}", dist.batch_isend_irecv, ops)
        o, l_ = packed_attention(q, (cur[0], cur[1]), chunk_rows[src_chunk], ctx if s == 0 else None, plan, cache,
                                 gqa_group, q_head_offset, with_lse=True, options=options)
        out, lse = (o, l_) if out is None else merge_attention_partials(out, lse, o, l_)
        for req in reqs:
            guarded(f"ring p2p wait step {s}", req.wait)
        if s < R - 1:
            cur = nxt
    return out


def chunk_rows(layout: PackedLayout, size: int, parts: int, device) -> list[JobRows]:
    return [layout.rows_by_job(c * size, (c + 1) * size, device) for c in range(parts)]
