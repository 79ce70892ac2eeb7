"""QK-norm + RoPE on the fused QKV projection: one pass from the QKV GEMM's output to the q/k/v the attention reads.

Input ``qkv`` (rows, (Hq + 2·Hkv)·D) as the routed QKV GEMM writes it. Output q (rows, Hq, D), k and v
(rows, Hkv, D), contiguous, in the activation dtype. q/k get the RMSNorm of their row's expert (per-head, over D),
then rotate-half RoPE with the given fp32 cos/sin tables (BAGEL's position ids). ``fp32_math`` follows BAGEL: the
generation forward normalizes and rotates in fp32 and rounds once; the prefill works in the activation dtype.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .kv_layout import TokenSlots, write_token_slots
from .linear import ExpertSegments, device_expert_ids, routed_apply
from .norms import rms_norm_reference
from .options import KernelOptions
from .qk_norm_rope_triton import qk_norm_rope_triton
from .rope import apply_rope_reference


def qk_norm_rope_reference(qkv: torch.Tensor, routing: ExpertSegments | None, q_norm: torch.Tensor,
                           k_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                           num_kv_heads: int, eps: float, fp32_math: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d = q_norm.shape[-1]
    rows, nq, nk = qkv.shape[0], num_heads * d, num_kv_heads * d
    q = qkv[:, :nq].reshape(rows, num_heads, d)
    k = qkv[:, nq:nq + nk].reshape(rows, num_kv_heads, d)
    v = qkv[:, nq + nk:].reshape(rows, num_kv_heads, d)
    if fp32_math:
        q, k = q.float(), k.float()
    segments = routing if routing is not None else ExpertSegments.uniform(rows, False)

    def norm(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return routed_apply(t, segments, lambda s: rms_norm_reference(s, w[0], eps),
                            lambda s: rms_norm_reference(s, w[1], eps))

    q = apply_rope_reference(norm(q, q_norm), cos, sin).to(qkv.dtype)
    k = apply_rope_reference(norm(k, k_norm), cos, sin).to(qkv.dtype)
    return q.contiguous(), k.contiguous(), v.contiguous()


def qk_norm_rope(qkv: torch.Tensor, routing: ExpertSegments | None, q_norm: torch.Tensor, k_norm: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int, eps: float,
                 fp32_math: bool, *, expert_ids: torch.Tensor | None = None,
                 options: KernelOptions | None = None, kv_out: TokenSlots | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split fused QKV rows into q, k, v with per-expert QK RMSNorm and RoPE applied to q and k.

    ``q_norm``/``k_norm`` are (E, D); ``cos``/``sin`` are (rows, D) fp32. ``kv_out``: also write row i's k and v
    into the paged cache at ``(pages[i], slots[i])`` (what ``write_token_slots`` does with the returned k and v,
    the same values; the Triton kernel stores them itself, so text decoding launches no scatter per layer)."""
    d = q_norm.shape[-1]
    width = (num_heads + 2 * num_kv_heads) * d
    if qkv.dim() != 2 or qkv.shape[1] != width:
        raise ValueError(f"qk_norm_rope: qkv must be (rows, {width}) for {num_heads} q / {num_kv_heads} kv heads "
                         f"of dim {d}; got {tuple(qkv.shape)}")
    if tuple(cos.shape) != (qkv.shape[0], d) or cos.shape != sin.shape:
        raise ValueError(f"qk_norm_rope: cos/sin must be ({qkv.shape[0]}, {d}); got {tuple(cos.shape)}, {tuple(sin.shape)}")
    if q_norm.shape != k_norm.shape or q_norm.dim() != 2:
        raise ValueError(f"qk_norm_rope: q_norm/k_norm must both be (experts, D); got {tuple(q_norm.shape)}, {tuple(k_norm.shape)}")
    if routing is not None and routing.num_tokens != qkv.shape[0]:
        raise ValueError(f"qk_norm_rope: routing covers {routing.num_tokens} rows but qkv has {qkv.shape[0]}")
    if kv_out is not None:
        _check_kv_out(kv_out, qkv.shape[0], num_kv_heads, d, qkv.device)
    if resolve_backend(qkv.device, options) == "reference":
        q, k, v = qk_norm_rope_reference(qkv, routing, q_norm, k_norm, cos, sin, num_heads, num_kv_heads, eps,
                                         fp32_math)
        if kv_out is not None:
            write_token_slots(kv_out.view, kv_out.pages, kv_out.slots, k, v)
        return q, k, v
    ids = device_expert_ids(routing, expert_ids, q_norm.shape[0], qkv.device)
    return qk_norm_rope_triton(qkv, ids, q_norm, k_norm, cos, sin,
                               num_heads, num_kv_heads, eps, fp32_math, kv_out)


def _check_kv_out(kv_out: TokenSlots, rows: int, num_kv_heads: int, d: int, device: torch.device) -> None:
    k, v = kv_out.view.k, kv_out.view.v
    if k.dim() != 4 or tuple(k.shape[2:]) != (num_kv_heads, d) or k.shape != v.shape:
        raise ValueError(f"qk_norm_rope: kv_out's cache views must be (blocks, block_size, {num_kv_heads}, {d}); got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if tuple(kv_out.pages.shape) != (rows,) or tuple(kv_out.slots.shape) != (rows,):
        raise ValueError(f"qk_norm_rope: kv_out needs one page and one slot per row ({rows}); got pages "
                         f"{tuple(kv_out.pages.shape)}, slots {tuple(kv_out.slots.shape)}")
    if k.device != device or kv_out.pages.device != device or kv_out.slots.device != device:
        raise ValueError(f"qk_norm_rope: kv_out's cache and slots must be on {device}")
