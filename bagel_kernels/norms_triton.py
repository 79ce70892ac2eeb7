"""Triton RMSNorm with per-expert weights (expert of each row read on the device), Qwen2 rounding."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpreting
from .fp8_quant_triton import (block_amax, encode_row_block, quantize_row_block, row_quantizer_buffers,
                               scale_from_amax)


@triton.jit
def _rms_norm(X, W, IDS, OUT, Q, QS, s_x, s_o, H, eps, HAS_IDS: tl.constexpr, BLOCK_H: tl.constexpr,
              QUANT: tl.constexpr = False, STATIC: tl.constexpr = False, INTERPRETER: tl.constexpr = False):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    ok = cols < H
    x = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    e = tl.load(IDS + row) if HAS_IDS else 0
    w = tl.load(W + e * H + cols, mask=ok, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / H + eps)
    # Qwen2: normalized activations are rounded to the input dtype, then scaled by the weight.
    xn = (x * rstd).to(OUT.dtype.element_ty).to(tl.float32)
    y = (xn * w).to(OUT.dtype.element_ty)
    if QUANT and STATIC:  # fp8_quant.norm_bound_scale of the row's expert weight, then quantize_rows_static
        scale = scale_from_amax(tl.sqrt_rn(H * 1.0) * block_amax(w, ok))
        yf = y.to(tl.float32)
        q = encode_row_block(yf, scale, INTERPRETER)
        bad = tl.sum(tl.where(ok & ((yf - yf) != 0.0), 1, 0), 0) > 0  # a NaN or inf in the row
        tl.store(Q + row * H + cols, q, mask=ok)
        tl.store(QS + row, tl.where(bad, float("nan"), scale))
    elif QUANT:  # the next projection's FP8 input: the rounded row, quantized per row (never written in bf16)
        q, scale = quantize_row_block(y.to(tl.float32), ok, INTERPRETER)
        tl.store(Q + row * H + cols, q, mask=ok)
        tl.store(QS + row, scale)
    else:
        tl.store(OUT + row * s_o + cols, y, mask=ok)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, expert_ids: torch.Tensor | None) -> torch.Tensor:
    m, h = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    out = torch.empty(m, h, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block = triton.next_power_of_2(h)
    # Warps fixed by the hidden size only (the reduction tree must not depend on M).
    _rms_norm[(m,)](x, weight.contiguous(), expert_ids if expert_ids is not None else x, out, out, out, x.stride(0),
                    out.stride(0), h, eps, HAS_IDS=expert_ids is not None, BLOCK_H=block,
                    num_warps=8 if block >= 2048 else 4)
    return out


def rms_norm_fp8_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, expert_ids: torch.Tensor | None,
                        static: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize_rows(rms_norm_triton(x, ...))`` in one pass: (codes (M, H) e4m3fn, scale (M,) fp32), the same bits
    (the same normalization code, then ``quantize_row_block``) without the bf16 rows ever reaching memory.
    ``static``: ``quantize_rows_static`` with each row's expert's ``norm_bound_scale`` instead (computed from the
    weight row the kernel loads anyway, so no launch and no cache)."""
    x, q, s = row_quantizer_buffers(x)
    m, h = x.shape
    if m == 0:
        return q, s
    block = triton.next_power_of_2(h)
    # OUT is passed only for its dtype (the rounding of the normalized row); nothing is stored through it.
    _rms_norm[(m,)](x, weight.contiguous(), expert_ids if expert_ids is not None else x, x, q, s, x.stride(0),
                    0, h, eps, HAS_IDS=expert_ids is not None, BLOCK_H=block, QUANT=True, STATIC=static,
                    INTERPRETER=triton_interpreting(), num_warps=8 if block >= 2048 else 4)
    return q, s
