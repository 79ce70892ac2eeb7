"""Ring attention over the ring group for the packed step (``bagel_model.packed``): each ring rank holds one
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

from bagel_kernels import ContiguousKV, joint_attention, merge_attention_partials
from bagel_model.packed import JobRows, PackedLayout, packed_attention_over

from .mesh import guarded


def ring_attention_exact(q, k, v, ctx, ring_ranks: list[int], ring_idx: int, group, q_rows: JobRows,
                         k_rows: JobRows, gqa_group: int, q_head_offset: int) -> torch.Tensor:
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
    k_all = torch.cat([b[0] for b in bufs])
    v_all = torch.cat([b[1] for b in bufs])
    return packed_attention_over(q, k_all, v_all, ctx, q_rows, k_rows, gqa_group, q_head_offset)


def ring_attention_fast(q, k, v, ctx, ring_ranks: list[int], ring_idx: int, group, q_rows: JobRows,
                        chunk_rows: list[JobRows], gqa_group: int, q_head_offset: int) -> torch.Tensor:
    """``chunk_rows[c]``: the rows of chunk c grouped per job (relative to the chunk's start)."""
    R = len(ring_ranks)
    kw = dict(gqa_group=gqa_group, q_head_offset=q_head_offset)
    qc = q.index_select(0, q_rows.index)
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
        kr = chunk_rows[src_chunk]
        seg = ContiguousKV(cur[0].index_select(0, kr.index), cur[1].index_select(0, kr.index), cu_seqlens=kr.cu,
                           max_seqlen=kr.max_len)
        segs = ([ctx] if (s == 0 and ctx is not None) else []) + [seg]
        r = joint_attention(qc, segs, cu_seqlens_q=q_rows.cu, max_seqlen_q=max(q_rows.max_len, 1), **kw)
        out, lse = (r.out, r.lse) if out is None else merge_attention_partials(out, lse, r.out, r.lse)
        for req in reqs:
            guarded(f"ring p2p wait step {s}", req.wait)
        if s < R - 1:
            cur = nxt
    o = torch.zeros_like(q)
    o.index_copy_(0, q_rows.index, out)
    return o


def chunk_rows(layout: PackedLayout, size: int, parts: int, device) -> list[JobRows]:
    return [layout.rows_by_job(c * size, (c + 1) * size, device) for c in range(parts)]
