"""Triton QK-norm + RoPE: one program per row handles all q and k heads (a [heads, D] tile) and copies v."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_layout import TokenSlots


@triton.jit
def _qk_norm_rope(QKV, s_qkv, IDS, QW, KW, COS, SIN, QO, KO, VO, HQ, HKV, eps,
                  KC, VC, PAGES, SLOTS, kc_p, kc_s, kc_h, kc_d, vc_p, vc_s, vc_h, vc_d,
                  HAS_IDS: tl.constexpr, FP32: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_V: tl.constexpr, KV_OUT: tl.constexpr = False):
    row = tl.program_id(0).to(tl.int64)
    ty = QO.dtype.element_ty
    heads = tl.arange(0, BLOCK_H)  # q heads then k heads
    d = tl.arange(0, D)
    half: tl.constexpr = D // 2
    rot = (d + half) % D  # rotate-half partner column
    sign = tl.where(d < half, -1.0, 1.0)
    ok = (heads < HQ + HKV)[:, None]
    base = QKV + row * s_qkv + heads[:, None] * D
    x = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    xr = tl.load(base + rot[None, :], mask=ok, other=0.0).to(tl.float32)
    e = tl.load(IDS + row) if HAS_IDS else 0
    is_q = (heads < HQ)[:, None]
    w = tl.where(is_q, tl.load(QW + e * D + d)[None, :], tl.load(KW + e * D + d)[None, :]).to(tl.float32)
    wr = tl.where(is_q, tl.load(QW + e * D + rot)[None, :], tl.load(KW + e * D + rot)[None, :]).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / D + eps)[:, None]
    c = tl.load(COS + row * D + d)[None, :]
    s = tl.load(SIN + row * D + d)[None, :]
    if FP32:  # generation: norm and rotation in fp32, one rounding at the end (BAGEL)
        y = (x * rstd) * w
        yr = (xr * rstd) * wr
        out = y * c + (sign[None, :] * yr) * s
    else:  # prefill: Qwen2 rounds after the norm, after the weight, and after each RoPE product and the sum
        y = ((x * rstd).to(ty).to(tl.float32) * w).to(ty).to(tl.float32)
        yr = ((xr * rstd).to(ty).to(tl.float32) * wr).to(ty).to(tl.float32)
        c = c.to(ty).to(tl.float32)
        s = s.to(ty).to(tl.float32)
        out = (y * c).to(ty).to(tl.float32) + ((sign[None, :] * yr) * s).to(ty).to(tl.float32)
    out = out.to(ty)
    q_ptr = QO + row * HQ * D + heads[:, None] * D + d[None, :]
    k_ptr = KO + row * HKV * D + (heads[:, None] - HQ) * D + d[None, :]
    tl.store(q_ptr, out, mask=is_q)
    tl.store(k_ptr, out, mask=ok & (heads[:, None] >= HQ))
    vh = tl.arange(0, BLOCK_V)[:, None]
    vok = vh < HKV
    v = tl.load(QKV + row * s_qkv + (HQ + HKV) * D + vh * D + d[None, :], mask=vok)
    tl.store(VO + row * HKV * D + vh * D + d[None, :], v, mask=vok)
    if KV_OUT:  # the paged cache's copy of k and v (write_token_slots: cast to the cache's dtype)
        page = tl.load(PAGES + row).to(tl.int64)
        slot = tl.load(SLOTS + row).to(tl.int64)
        kc = KC + page * kc_p + slot * kc_s + (heads[:, None] - HQ) * kc_h + d[None, :] * kc_d
        tl.store(kc, out.to(KC.dtype.element_ty), mask=ok & (heads[:, None] >= HQ))
        vc = VC + page * vc_p + slot * vc_s + vh * vc_h + d[None, :] * vc_d
        tl.store(vc, v.to(VC.dtype.element_ty), mask=vok)


def qk_norm_rope_triton(qkv: torch.Tensor, expert_ids: torch.Tensor | None, q_norm: torch.Tensor,
                        k_norm: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int,
                        num_kv_heads: int, eps: float, fp32_math: bool, kv_out: TokenSlots | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, d = qkv.shape[0], q_norm.shape[-1]
    if d & (d - 1):
        raise ValueError(f"qk_norm_rope (triton): head_dim must be a power of two, got {d}")
    if qkv.stride(1) != 1:
        qkv = qkv.contiguous()
    q = torch.empty(rows, num_heads, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(rows, num_kv_heads, d, dtype=qkv.dtype, device=qkv.device)
    v = torch.empty(rows, num_kv_heads, d, dtype=qkv.dtype, device=qkv.device)
    if rows == 0:
        return q, k, v
    if kv_out is None:  # never read (KV_OUT off): placeholders of the right kinds
        cache_args = (k, v, k, k) + (0,) * 8
    else:
        kc, vc = kv_out.view.k, kv_out.view.v
        cache_args = (kc, vc, kv_out.pages, kv_out.slots, *kc.stride(), *vc.stride())
    _qk_norm_rope[(rows,)](
        qkv, qkv.stride(0), expert_ids if expert_ids is not None else qkv, q_norm.contiguous(), k_norm.contiguous(),
        cos.float().contiguous(), sin.float().contiguous(), q, k, v, num_heads, num_kv_heads, eps,
        *cache_args,
        HAS_IDS=expert_ids is not None, FP32=fp32_math, D=d, BLOCK_H=triton.next_power_of_2(num_heads + num_kv_heads),
        BLOCK_V=triton.next_power_of_2(num_kv_heads), KV_OUT=kv_out is not None, num_warps=4)
    return q, k, v
