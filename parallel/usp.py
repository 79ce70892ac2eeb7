"""Hybrid sequence parallelism (USP) of the packed step: Ulysses inside, Ring across; either degree may be 1.

Returns an ``AttentionFn`` for ``bagel_model`` layers: this rank's packed rows in, the same rows out.
"""
from __future__ import annotations

import torch

from bagel_kernels import KernelOptions
from bagel_model.engine.layout import PackedContext, PackedLayout, packed_attention

from .mesh import Mesh
from .ring import chunk_rows, ring_attention_exact, ring_attention_fast
from .ulysses import gather_heads, head_split, kv_heads_for, scatter_heads


def sp_attention(mesh: Mesh, layout: PackedLayout, contexts: PackedContext, num_heads: int, num_kv_heads: int,
                 options: KernelOptions | None = None):
    """``contexts``: the jobs' packed contexts (``bagel_model.engine.layout.packed_context``), replicated."""
    c = mesh.config
    U, R = c.ulysses, c.ring
    group = num_heads // num_kv_heads
    q_ranges = head_split(num_heads, U)
    kv_ranges = [kv_heads_for(r, group) for r in q_ranges]
    h0, _ = q_ranges[mesh.uly_idx] if U > 1 else (0, num_heads)
    kv0, kv1 = kv_ranges[mesh.uly_idx] if U > 1 else (0, num_kv_heads)
    # The context is replicated on every rank; each rank reads only the KV heads its query heads need.
    ctxs = contexts.heads(kv0, kv1) if U > 1 else contexts
    kw = dict(gqa_group=group, q_head_offset=h0, options=options)
    size = layout.split.chunk * U  # rows of one Ulysses group (one ring chunk)
    rows: dict = {}
    cache: dict = {}

    def index(device):
        if not rows:
            rows["q"] = layout.query_plan(mesh.ring_idx * size, (mesh.ring_idx + 1) * size, device)
            rows["k"] = layout.rows_by_job(0, layout.split.padded, device)
            if R > 1 and c.ring_mode == "fast":
                rows["chunks"] = chunk_rows(layout, size, R, device)
        return rows

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if U > 1:  # sequence -> heads: whole super-chunk of the Ulysses group, my heads (and the KV heads they read)
            q, k, v = scatter_heads(q, k, v, q_ranges, kv_ranges, mesh.uly_idx, mesh.uly_group,
                                    f"ulysses qkv layer {layer_idx}")
        ix = index(q.device)
        ctx = ctxs.segment(layer_idx, ix["q"].jobs, q.device, cache)
        if R == 1:
            o = packed_attention(q, (k, v), ix["k"], ctx, ix["q"], cache, **kw)
        elif c.ring_mode == "exact":
            o = ring_attention_exact(q, k, v, ctx, mesh.ring_ranks, mesh.ring_idx, mesh.ring_group, ix["q"], ix["k"],
                                     cache, **kw)
        else:
            o = ring_attention_fast(q, k, v, ctx, mesh.ring_ranks, mesh.ring_idx, mesh.ring_group, ix["q"],
                                    ix["chunks"], cache, **kw)
        if U > 1:
            o = gather_heads(o, q_ranges, mesh.uly_idx, mesh.uly_group, f"ulysses out layer {layer_idx}")
        return o

    return fn
