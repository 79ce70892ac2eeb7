"""Hybrid sequence parallelism (USP): Ulysses inside, Ring across; either degree may be 1.

Returns an ``AttentionFn`` for ``bagel_model`` layers: local rows in, local rows out.
"""
from __future__ import annotations

import torch

from bagel_kernels import ContiguousKV, KernelOptions, PagedKV
from bagel_model.layers import local_attention

from .mesh import Mesh
from .ring import ring_attention_exact, ring_attention_fast
from .ulysses import gather_heads, head_split, kv_heads_for, scatter_heads


def _slice_heads(seg, a: int, b: int):
    if seg is None:
        return None
    if isinstance(seg, PagedKV):
        return PagedKV(seg.k[:, :, a:b], seg.v[:, :, a:b], seg.block_table, seg.seqlens)
    return ContiguousKV(seg.k[:, a:b], seg.v[:, a:b], seg.cu_seqlens, seg.seqlens, seg.max_seqlen)


def sp_attention(mesh: Mesh, contexts: list, n_valid_total: int, num_heads: int, num_kv_heads: int,
                 options: KernelOptions | None = None):
    c = mesh.config
    U, R = c.ulysses, c.ring
    group = num_heads // num_kv_heads
    q_ranges = head_split(num_heads, U)
    kv_ranges = [kv_heads_for(r, group) for r in q_ranges]
    h0, _ = q_ranges[mesh.uly_idx] if U > 1 else (0, num_heads)
    kv0, kv1 = kv_ranges[mesh.uly_idx] if U > 1 else (0, num_kv_heads)
    # The context is replicated on every rank; each rank reads only the KV heads its query heads need.
    ctxs = [_slice_heads(c_, kv0, kv1) for c_ in contexts] if contexts else []
    kw = dict(gqa_group=group, q_head_offset=h0, options=options)
    local = local_attention(ctxs, n_valid_total, **kw) if R == 1 else None

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if U > 1:  # sequence -> heads: whole super-chunk of the Ulysses group, my heads (and the KV heads they read)
            q = scatter_heads(q, q_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses q layer {layer_idx}")
            k = scatter_heads(k, kv_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses k layer {layer_idx}")
            v = scatter_heads(v, kv_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses v layer {layer_idx}")
        if R > 1:
            ring_fn = ring_attention_exact if c.ring_mode == "exact" else ring_attention_fast
            ctx = ctxs[layer_idx] if ctxs else None
            o = ring_fn(q, k, v, ctx, mesh.ring_ranks, mesh.ring_idx, mesh.ring_group, n_valid_total, **kw)
        else:
            o = local(layer_idx, q, k, v)
        if U > 1:
            o = gather_heads(o, q_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses out layer {layer_idx}")
        return o

    return fn
