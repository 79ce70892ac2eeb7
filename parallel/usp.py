"""Hybrid sequence parallelism (USP): Ulysses inside, Ring across; either degree may be 1.

Returns an ``AttentionFn`` for ``bagel_model`` layers: local rows in, local rows out.
"""
from __future__ import annotations

import torch

from bagel_kernels import ContiguousKV, PagedKV, joint_attention

from .mesh import Mesh
from .ring import ring_attention_exact, ring_attention_fast
from .ulysses import gather_heads, head_split, kv_heads_for, scatter_heads


def _slice_heads(seg, a: int, b: int):
    if seg is None:
        return None
    if isinstance(seg, PagedKV):
        return PagedKV(seg.k[:, :, a:b], seg.v[:, :, a:b], seg.block_table, seg.seqlens)
    return ContiguousKV(seg.k[:, a:b], seg.v[:, a:b], seg.cu_seqlens, seg.seqlens, seg.max_seqlen)


def sp_attention(mesh: Mesh, contexts: list, n_valid_total: int, num_heads: int, num_kv_heads: int):
    c = mesh.config
    U, R = c.ulysses, c.ring
    group = num_heads // num_kv_heads
    q_ranges = head_split(num_heads, U)
    kv_ranges = [kv_heads_for(r, group) for r in q_ranges]
    h0, _ = q_ranges[mesh.uly_idx] if U > 1 else (0, num_heads)
    kv0, kv1 = kv_ranges[mesh.uly_idx] if U > 1 else (0, num_kv_heads)
    lens: list[torch.Tensor] = []

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = _slice_heads(contexts[layer_idx] if contexts else None, kv0, kv1)
        if U > 1:  # sequence -> heads: whole super-chunk of the Ulysses group, my heads (and the KV heads they read)
            q = scatter_heads(q, q_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses q layer {layer_idx}")
            k = scatter_heads(k, kv_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses k layer {layer_idx}")
            v = scatter_heads(v, kv_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses v layer {layer_idx}")
        kw = dict(gqa_group=group, q_head_offset=h0)
        if R > 1:
            ring_fn = ring_attention_exact if c.ring_mode == "exact" else ring_attention_fast
            o = ring_fn(q, k, v, ctx, mesh.ring_ranks, mesh.ring_idx, mesh.ring_group, n_valid_total, **kw)
        else:
            if not lens:
                lens.append(torch.full((1,), n_valid_total, dtype=torch.int32, device=k.device))
            segs = ([ctx] if ctx is not None else []) + [ContiguousKV(k, v, seqlens=lens[0])]
            o = joint_attention(q, segs, **kw).out
        if U > 1:
            o = gather_heads(o, q_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses out layer {layer_idx}")
        return o

    return fn
