"""Context-KV broadcast: the rank that holds a request's prefill KV sends it once to every rank that needs it."""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_kernels import ContiguousKV
from bagel_model.core.model import BranchContext

from .mesh import guarded


def broadcast_contexts(contexts: dict | None, names: list[str], num_layers: int, lengths: dict[str, int],
                       kv_shape: tuple[int, int], dtype, device, src: int = 0) -> dict:
    """Broadcast per-layer (K, V) of each named branch context from ``src``; shapes come from host metadata
    (``lengths``, known to every rank from the prompt), so no shape exchange is needed."""
    rank = dist.get_rank()
    out = {}
    for name in names:
        n = lengths[name]
        if n == 0:
            out[name] = BranchContext.empty(num_layers)
            continue
        kv = []
        for i in range(num_layers):
            if rank == src:
                seg = contexts[name].kv[i]
                buf = torch.stack([seg.k, seg.v]).contiguous()
            else:
                buf = torch.empty((2, n) + tuple(kv_shape), dtype=dtype, device=device)
            guarded(f"context-KV broadcast {name} layer {i}", dist.broadcast, buf, src=src)
            kv.append(ContiguousKV(buf[0], buf[1], seqlens=torch.full((1,), n, dtype=torch.int32, device=device)))
        out[name] = BranchContext(kv=kv, rope_position=n, length=n)
    return out
