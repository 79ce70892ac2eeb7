"""Ring attention over the ring group with a joint (front) context.

exact: every rank walks KV chunks in global order 0..R-1, carrying the fp32 resumable state between launches; chunk
c reaches all ranks by a broadcast from its owner (a broadcast-shaped pipeline: all broadcasts are issued up front
and chunk c is waited for just before it is used, so transfers overlap compute). Bit-identical to one device.
fast: classic rotation with async P2P + log-sum-exp merge; tolerance-exact only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_kernels import ContiguousKV, KernelOptions, joint_attention, merge_attention_partials

from .mesh import guarded


def _valid(n_valid_total: int, chunk: int, c: int, device) -> torch.Tensor:
    return torch.full((1,), max(0, min(chunk, n_valid_total - c * chunk)), dtype=torch.int32, device=device)


def ring_attention_exact(q, k, v, ctx, ring_ranks: list[int], ring_idx: int, group, n_valid_total: int,
                         gqa_group: int, q_head_offset: int, options: KernelOptions | None = None) -> torch.Tensor:
    R, chunk = len(ring_ranks), k.shape[0]
    kv = torch.stack([k, v]).contiguous()
    bufs, works = [], []
    for c in range(R):
        buf = kv if c == ring_idx else torch.empty_like(kv)
        works.append(guarded(f"ring broadcast chunk {c}", dist.broadcast, buf, src=ring_ranks[c], group=group,
                             async_op=True))
        bufs.append(buf)
    state = None
    kw = dict(gqa_group=gqa_group, q_head_offset=q_head_offset, options=options)
    for c in range(R):
        guarded(f"ring wait chunk {c}", works[c].wait)
        seg = ContiguousKV(bufs[c][0], bufs[c][1], seqlens=_valid(n_valid_total, chunk, c, q.device))
        segs = ([ctx] if (c == 0 and ctx is not None) else []) + [seg]
        state = joint_attention(q, segs, state=state, finalize=(c == R - 1), **kw)
    return state.out


def ring_attention_fast(q, k, v, ctx, ring_ranks: list[int], ring_idx: int, group, n_valid_total: int,
                        gqa_group: int, q_head_offset: int, options: KernelOptions | None = None) -> torch.Tensor:
    R, chunk = len(ring_ranks), k.shape[0]
    kw = dict(gqa_group=gqa_group, q_head_offset=q_head_offset, options=options)
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
        seg = ContiguousKV(cur[0], cur[1], seqlens=_valid(n_valid_total, chunk, src_chunk, q.device))
        segs = ([ctx] if (s == 0 and ctx is not None) else []) + [seg]
        r = joint_attention(q, segs, **kw)
        out, lse = (r.out, r.lse) if out is None else merge_attention_partials(out, lse, r.out, r.lse)
        for req in reqs:
            guarded(f"ring p2p wait step {s}", req.wait)
        if s < R - 1:
            cur = nxt
    return out
