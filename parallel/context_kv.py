"""Context-KV broadcast: the rank that holds a request's prefill KV sends it once to every rank that needs it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_model.engine.kv_cache import Context, empty_context, new_cache

from .mesh import guarded


def broadcast_contexts(contexts: dict[str, Context] | None, shapes: dict[str, tuple[int, int]], model,
                       src: int = 0) -> dict[str, Context]:
    """Broadcast each named context's per-layer (K, V) from ``src``; ``shapes`` gives each name's (length, RoPE
    position), host metadata every rank knows from the prompt, so no shape exchange is needed. Every other rank
    writes what it receives into a paged cache of its own (the same values: the step reads the same bits); ``src``
    keeps its own contexts."""
    rank = dist.get_rank()
    cfg = model.cfg
    out = {}
    for name, (n, rope) in shapes.items():
        if rank == src:
            out[name] = contexts[name]
        elif n == 0:
            out[name] = empty_context(model)
        else:
            out[name] = Context(new_cache(model, n), rope)
        for i in range(cfg.num_layers if n else 0):
            if rank == src:
                buf = torch.stack(contexts[name].cache.read(i)).contiguous()
            else:
                buf = torch.empty((2, n, cfg.num_kv_heads, cfg.head_dim), dtype=model.dtype, device=model.device)
            guarded(f"context-KV broadcast {name} layer {i}", dist.broadcast, buf, src=src)
            if rank != src:
                out[name].cache.write(i, buf[0], buf[1])
        if rank != src and n:
            out[name].cache.commit(n)
    return out
