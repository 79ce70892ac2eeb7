"""Hybrid sequence parallelism (USP) of the packed step: Ulysses inside, Ring across; either degree may be 1.

Returns an ``AttentionFn`` for ``bagel_model`` layers: this rank's packed rows in, the same rows out.

Pure Ulysses (ring 1) overlaps its all-to-alls with attention when every rank's heads split into two groups that
share no KV head (Ulysses 2 over BAGEL's 28/4 heads: 7 query heads + 1 KV head per group): both groups' q/k/v are
sent on a side stream, group 0's attention runs while group 1's inputs travel, and group 0's output travels back
while group 1 attends. Heads are independent in attention, so each head's output has the bits of the one-group
path (and of one device).
"""
from __future__ import annotations

from contextlib import nullcontext

import torch

from bagel_kernels import KernelOptions
from bagel_model.packed import PackedContext, PackedLayout, packed_attention

from .mesh import Mesh
from .ring import chunk_rows, ring_attention_exact, ring_attention_fast
from .ulysses import exchange_heads_back, gather_heads, head_groups, head_split, kv_heads_for, scatter_heads


def sp_attention(mesh: Mesh, layout: PackedLayout, contexts: PackedContext, num_heads: int, num_kv_heads: int,
                 options: KernelOptions | None = None, overlap: bool = True):
    """``contexts``: the jobs' packed contexts (``bagel_model.packed.packed_context``), replicated. ``overlap``:
    pipeline pure Ulysses' all-to-alls against attention by head groups where the heads allow (see above)."""
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
    # Head groups of every rank (the same decision on every rank: the collectives must match).
    per_rank = [head_groups(q_ranges[r], kv_ranges[r], group, 2) for r in range(U)] if U > 1 and R == 1 else []
    pipelined = overlap and bool(per_rank) and all(g is not None for g in per_rank)
    if pipelined:
        n_groups = len(per_rank[0])
        group_q = [[per_rank[r][g][0] for r in range(U)] for g in range(n_groups)]
        group_kv = [[per_rank[r][g][1] for r in range(U)] for g in range(n_groups)]
        group_ctx = [contexts.heads(*per_rank[mesh.uly_idx][g][1]) for g in range(n_groups)]
    streams: dict = {}

    def index(device):
        if not rows:
            rows["q"] = layout.query_plan(mesh.ring_idx * size, (mesh.ring_idx + 1) * size, device)
            rows["k"] = layout.rows_by_job(0, layout.split.padded, device)
            if R > 1 and c.ring_mode == "fast":
                rows["chunks"] = chunk_rows(layout, size, R, device)
        return rows

    def overlapped(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        me, ug = mesh.uly_idx, mesh.uly_group
        ix = index(q.device)
        if q.device.type == "cuda":
            main = torch.cuda.current_stream(q.device)
            comm = streams.setdefault(q.device, torch.cuda.Stream(q.device))
            comm.wait_stream(main)  # q, k, v are ready (and, under capture, the side stream joins the graph)

            def on_comm():
                return torch.cuda.stream(comm)

            def mark(stream):
                ev = torch.cuda.Event()
                ev.record(stream)
                return ev
        else:  # no streams: the same collectives in the same order, one after another
            main = comm = None

            def on_comm():
                return nullcontext()

            def mark(stream):
                return None

        def wait(stream, ev):
            if stream is not None:
                stream.wait_event(ev)

        # Every rank issues its collectives in this order: scatter g0, scatter g1, ..., back g0, back g1, ...
        inputs, ready = [], []
        for g in range(n_groups):
            with on_comm():
                inputs.append(scatter_heads([q, k, v], [group_q[g], group_kv[g], group_kv[g]], me, ug,
                                            f"ulysses qkv group {g} layer {layer_idx}"))
                ready.append(mark(comm))
        back = []
        for g in range(n_groups):
            wait(main, ready[g])
            qg, kg, vg = inputs[g]
            ctx = group_ctx[g].segment(layer_idx, ix["q"].jobs, q.device, cache)
            og = packed_attention(qg, (kg, vg), ix["k"], ctx, ix["q"], cache, gqa_group=group,
                                  q_head_offset=group_q[g][me][0], options=options)
            done = mark(main)
            wait(comm, done)
            with on_comm():
                back.append(exchange_heads_back(og, group_q[g], ug, f"ulysses out group {g} layer {layer_idx}"))
        if main is not None:
            main.wait_stream(comm)
        # heads in global order: source rank's groups in order, ranks in order
        return torch.cat([back[g][src] for src in range(U) for g in range(n_groups)], dim=1)

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if pipelined:
            return overlapped(layer_idx, q, k, v)
        if U > 1:  # sequence -> heads: whole super-chunk of the Ulysses group, my heads (and the KV heads they read)
            q, k, v = scatter_heads([q, k, v], [q_ranges, kv_ranges, kv_ranges], mesh.uly_idx, mesh.uly_group,
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

    fn.pipelined = pipelined  # which path this rank's layers take (tests and benchmarks read it)
    return fn
