"""Host-side launch helpers shared by the Triton and Gluon kernels (no kernel code here).

The attention kernels' fixed blocks live here because both attention kernels must use the same ones: the Gluon
kernel reproduces the Triton kernel's bits only with the Triton kernel's BLOCK_N (docs/DESIGN.md §3).
"""
from __future__ import annotations

import torch

from .attention_types import ContiguousKV

TRITON_BLOCK_M = 128  # query rows per attention tile (16-bit inputs)
TRITON_BLOCK_N = 128  # keys per attention block: fixed, never chosen from the problem (exactness)
LOG2E = 1.4426950408889634

_DUMMIES: dict[tuple[str, int | None], torch.Tensor] = {}


def _dummy(dev: torch.device) -> torch.Tensor:
    """A 1-element int32 device tensor for pointer arguments a launch does not read (cached: no allocation per call)."""
    key = (dev.type, dev.index)
    t = _DUMMIES.get(key)
    if t is None:
        t = _DUMMIES[key] = torch.zeros(1, dtype=torch.int32, device=dev)
    return t


def _i32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.int32 else t.to(torch.int32)


def _contiguous_meta(seg: ContiguousKV, dummy: torch.Tensor) -> tuple[torch.Tensor, bool, torch.Tensor, bool, int]:
    """(cu, has_cu, lens, has_lens, scalar length) of a contiguous segment; the kernel reads lengths from cu
    differences when no seqlens are given, so nothing is computed on the host or launched for them."""
    cu, has_cu = (_i32(seg.cu_seqlens), True) if seg.cu_seqlens is not None else (dummy, False)
    lens, has_lens = (_i32(seg.seqlens), True) if seg.seqlens is not None else (dummy, False)
    return cu, has_cu, lens, has_lens, seg.k.shape[0]


_SM_COUNT: dict[int, int] = {}


def _num_programs(device: torch.device, tiles: int) -> int:
    """Persistent-grid size of a routed GEMM launch: one program per SM (at most one per tile)."""
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _SM_COUNT:  # host overhead matters for the small prefill GEMMs: look it up once
            _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        sms = _SM_COUNT[idx]
    else:
        sms = 4  # interpreter: a few programs so the persistent loop is exercised
    return max(1, min(sms, tiles))
