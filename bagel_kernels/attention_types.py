"""Inputs and outputs of the joint attention: KV segments, resumable state, result."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ContiguousKV:
    """Current-token keys/values stored contiguously: ``k``, ``v`` of shape (T, H_kv, D).

    Varlen: sequence b occupies rows ``cu_seqlens[b] : cu_seqlens[b+1]`` of the storage; only its first
    ``seqlens[b]`` rows are real keys (the rest are padding and contribute exactly nothing). With ``seqlens`` given,
    ``cu_seqlens[b]`` is only sequence b's start: starts may come in any order and sequences may share rows (several
    query sequences reading one key set; ``cu_seqlens[B]`` is then unused). ``max_seqlen`` is a host
    int bounding the storage length of any sequence (defaults to T), so no launch reads lengths on the host.
    """

    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor | None = None
    seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def span(self) -> int:
        """Host upper bound of one sequence's storage length."""
        return self.max_seqlen if self.max_seqlen is not None else self.k.shape[0]


@dataclass(frozen=True)
class PagedKV:
    """Frozen context cache in pages: ``k``/``v`` are (num_blocks, block_size, H_kv, D) strided views
    (see ``kv_layout.normalize_kv_cache``); ``block_table`` (B, max_pages) int32, ``seqlens`` (B,) int32."""

    k: torch.Tensor
    v: torch.Tensor
    block_table: torch.Tensor
    seqlens: torch.Tensor

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def block_size(self) -> int:
        return self.k.shape[1]

    @property
    def span(self) -> int:
        return self.block_table.shape[1] * self.block_size


Segment = ContiguousKV | PagedKV


@dataclass
class AttentionState:
    """Running online-softmax state in fp32, packed like q: acc (Tq, Hq, D), m and l (Tq, Hq).

    Backend-specific units (the Triton kernel keeps m in log2 units): resume only with the backend that made it.
    """

    acc: torch.Tensor
    m: torch.Tensor
    l: torch.Tensor
    backend: str

    @staticmethod
    def empty(tq: int, hq: int, d: int, device, backend: str) -> "AttentionState":
        return AttentionState(
            acc=torch.zeros(tq, hq, d, dtype=torch.float32, device=device),
            m=torch.full((tq, hq), float("-inf"), dtype=torch.float32, device=device),
            l=torch.zeros(tq, hq, dtype=torch.float32, device=device),
            backend=backend,
        )


@dataclass
class AttentionOutput:
    out: torch.Tensor  # (Tq, Hq, D) in q's dtype
    lse: torch.Tensor  # (Tq, Hq) fp32, natural log; -inf for a row that saw no key
