"""A context — one CFG branch of one request — from the prefill to the denoise step: a paged per-layer KV cache in
any ``bagel_kernels`` layout, and the RoPE position generation continues from.

The prefill writes K/V (after k_norm + RoPE) into pages; the attention reads the pages in place through
``PagedKV`` (strided views from ``bagel_kernels.kv_layout``), so stage 1 never needs the writer's layout. The same
``Context`` object is what the prefill returns, what the transfer payload is read from and written back into, and
what a denoise job attends (docs/DESIGN.md §5).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from bagel_kernels import PagedKV, allocate_kv_cache, normalize_kv_cache
from bagel_kernels.kv_layout import read_tokens, token_slots, write_token_slots

DEFAULT_BLOCK_SIZE = 16


class PagedCache:
    def __init__(self, num_layers: int, capacity: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str, layout: str = "flash_attn", block_size: int = DEFAULT_BLOCK_SIZE):
        num_blocks = max(1, -(-capacity // block_size))
        self.layout, self.capacity, self.num_layers = layout, num_blocks * block_size, num_layers
        self.storage = [allocate_kv_cache(layout, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
                        for _ in range(num_layers)]
        self.views = [normalize_kv_cache(s, layout) for s in self.storage]
        # pages in reverse order: the attention must follow the table, not assume page i holds tokens of block i
        self.block_table = torch.arange(num_blocks - 1, -1, -1, dtype=torch.int32, device=device)[None]
        self.length = 0  # host-side: the layout is known on the host, never read back from the device
        self.seqlens = torch.zeros(1, dtype=torch.int32, device=device)
        self._slots: tuple[int, int, torch.Tensor, torch.Tensor] | None = None  # (length, n, pages, slots) of a forward

    def fork(self) -> "PagedCache":
        """A cache that shares these pages but has its own length: appending to the fork (decode) writes only past
        this cache's length, so readers of this cache (stage 1) keep seeing exactly the prefill KV."""
        other = copy.copy(self)
        other.seqlens = self.seqlens.clone()
        return other

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the next ``len(k)`` tokens of ``layer`` (call ``commit`` once all layers are written). The tokens'
        pages and slots are the same for every layer: computed at the first layer's write of a forward, reused."""
        n = k.shape[0]
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens exceed capacity {self.capacity}")
        if n == 0:
            return
        if self._slots is None or self._slots[:2] != (self.length, n):
            self._slots = (self.length, n, *token_slots(self.block_table[0], self.length, n,
                                                        self.views[layer].block_size, k.device))
        write_token_slots(self.views[layer], self._slots[2], self._slots[3], k, v)

    def commit(self, n: int) -> None:
        self.length += n
        self.seqlens.fill_(self.length)  # a fill from a host int: no synchronization

    def segments(self) -> list[PagedKV | None]:
        """Per-layer context segments for ``joint_attention`` (None while empty)."""
        if self.length == 0:
            return [None] * self.num_layers
        return [PagedKV(vw.k, vw.v, self.block_table, self.seqlens) for vw in self.views]

    def read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous (length, H_kv, D) copies of one layer's K and V (the transfer payload)."""
        return read_tokens(self.views[layer], self.block_table[0], self.length)


@dataclass(eq=False)
class Context:
    """One branch's frozen context: its paged K/V and the RoPE position of the image block that follows it. Jobs
    of the denoise step are keyed by the identity of their context object (branches that share one are one job)."""

    cache: PagedCache
    rope_position: int

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def kv(self) -> list[PagedKV | None]:
        """Per-layer segments for the attention (None for every layer while empty)."""
        return self.cache.segments()

    def fork(self) -> "Context":
        """A context whose appends (decoding) do not show in this one (``PagedCache.fork``)."""
        return Context(self.cache.fork(), self.rope_position)


def new_cache(model, capacity: int, layout: str = "flash_attn") -> PagedCache:
    """An empty paged cache for ``model``'s layers, KV heads, head_dim, dtype and device."""
    cfg = model.cfg
    return PagedCache(cfg.num_layers, capacity, cfg.num_kv_heads, cfg.head_dim, model.dtype, model.device, layout)


def empty_context(model) -> Context:
    """A context without tokens (text-to-image's no-text branch): the image block starts at position 0."""
    return Context(new_cache(model, 1), 0)
