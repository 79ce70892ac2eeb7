"""Normalize the paged KV-cache layouts of the serving stacks to one strided view, without copying.

Every layout in ``LAYOUTS`` is a view of one canonical pair ``(k, v)`` of shape
``(num_blocks, block_size, num_kv_heads, head_dim)``; the views keep the original strides, and the attention
kernel reads them through those strides.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("flash_attn", "flashinfer_nhd", "flashinfer_hnd", "separate", "packed")
_DOC = {
    "flash_attn": "(2, num_blocks, block_size, H_kv, D): K/V on dim 0 (vLLM flash-attn backend)",
    "flashinfer_nhd": "(num_blocks, 2, block_size, H_kv, D): K/V on dim 1",
    "flashinfer_hnd": "(num_blocks, 2, H_kv, block_size, D): K/V on dim 1, heads before tokens",
    "separate": "two tensors k_cache, v_cache of (num_blocks, block_size, H_kv, D) (flash_attn_with_kvcache)",
    "packed": "(num_blocks, H_kv, block_size, 2*D): K and V packed on the last dim (newer vLLM)",
}


@dataclass(frozen=True)
class PagedKVView:
    """K and V as strided (num_blocks, block_size, H_kv, D) views of a paged cache."""

    k: torch.Tensor
    v: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    @property
    def block_size(self) -> int:
        return self.k.shape[1]


def _expect(cond: bool, layout: str, shape) -> None:
    if not cond:
        raise ValueError(f"KV cache of shape {tuple(shape)} does not match layout {layout!r}: expected {_DOC[layout]}")


def normalize_kv_cache(cache, layout: str) -> PagedKVView:
    """Return the (K, V) views of ``cache`` stored in ``layout`` (one of ``LAYOUTS``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown KV-cache layout {layout!r}; known layouts: " + "; ".join(f"{k}: {v}" for k, v in _DOC.items()))
    if layout == "separate":
        _expect(isinstance(cache, (tuple, list)) and len(cache) == 2, layout, getattr(cache, "shape", ()))
        k, v = cache
        _expect(k.dim() == 4 and k.shape == v.shape, layout, k.shape)
        return PagedKVView(k, v)
    _expect(isinstance(cache, torch.Tensor), layout, ())
    shape = cache.shape
    if layout == "flash_attn":
        _expect(cache.dim() == 5 and shape[0] == 2, layout, shape)
        return PagedKVView(cache[0], cache[1])
    if layout == "flashinfer_nhd":
        _expect(cache.dim() == 5 and shape[1] == 2, layout, shape)
        return PagedKVView(cache[:, 0], cache[:, 1])
    if layout == "flashinfer_hnd":
        _expect(cache.dim() == 5 and shape[1] == 2, layout, shape)
        return PagedKVView(cache[:, 0].transpose(1, 2), cache[:, 1].transpose(1, 2))
    # packed
    _expect(cache.dim() == 4 and shape[-1] % 2 == 0, layout, shape)
    d = shape[-1] // 2
    return PagedKVView(cache[..., :d].transpose(1, 2), cache[..., d:].transpose(1, 2))


def allocate_kv_cache(
    layout: str, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
):
    """Allocate an (uninitialized-as-zero) cache in ``layout``; returns the raw storage object of that layout."""
    nb, bs, h, d = num_blocks, block_size, num_kv_heads, head_dim
    kw = dict(dtype=dtype, device=device)
    if layout == "flash_attn":
        return torch.zeros(2, nb, bs, h, d, **kw)
    if layout == "flashinfer_nhd":
        return torch.zeros(nb, 2, bs, h, d, **kw)
    if layout == "flashinfer_hnd":
        return torch.zeros(nb, 2, h, bs, d, **kw)
    if layout == "separate":
        return (torch.zeros(nb, bs, h, d, **kw), torch.zeros(nb, bs, h, d, **kw))
    if layout == "packed":
        return torch.zeros(nb, h, bs, 2 * d, **kw)
    raise ValueError(f"unknown KV-cache layout {layout!r}; known: {LAYOUTS}")


def token_slots(block_table_row: torch.Tensor, start: int | torch.Tensor, n: int, block_size: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(page, slot in the page) of tokens ``start .. start+n`` of one sequence. Every layer of a cache shares the
    block table and block size, so a forward computes them once and writes each layer with ``write_token_slots``
    (per layer they were six small kernels of each decode token). ``start`` may be a one-element
    device tensor (a CUDA-graph decode step writes where the device says)."""
    device = block_table_row.device if device is None else device
    pos = torch.arange(n, device=device) + start
    return block_table_row.to(device).long()[pos // block_size], pos % block_size


@dataclass(frozen=True)
class TokenSlots:
    """Where a forward's new tokens go in one layer's paged cache: the layer's view and each token's (page, slot in
    the page), as ``token_slots`` gives them. A kernel that produces K and V can write them there itself
    (``qk_norm_rope(..., kv_out=)``), which is what ``write_token_slots`` does with two scatters."""

    view: PagedKVView
    pages: torch.Tensor
    slots: torch.Tensor


def write_token_slots(view: PagedKVView, pages: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> None:
    """Write ``k``/``v`` (n, H_kv, D) at ``token_slots``'s (pages, slots), in place through the view."""
    view.k[pages, slots] = k.to(view.k.dtype)
    view.v[pages, slots] = v.to(view.v.dtype)


def write_tokens(view: PagedKVView, block_table_row: torch.Tensor, start: int | torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> None:
    """Write tokens ``start .. start+len(k)`` of one sequence into its pages (through the views, in place):
    ``token_slots`` + ``write_token_slots`` for one layer."""
    n = k.shape[0]
    if n == 0:
        return
    pages, slots = token_slots(block_table_row, start, n, view.block_size, k.device)
    write_token_slots(view, pages, slots, k, v)


def read_tokens(view: PagedKVView, block_table_row: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the first ``length`` tokens of one sequence into contiguous (length, H_kv, D) tensors."""
    pos = torch.arange(length, device=view.k.device)
    pages = block_table_row.to(view.k.device).long()[pos // view.block_size]
    slots = pos % view.block_size
    return view.k[pages, slots], view.v[pages, slots]
