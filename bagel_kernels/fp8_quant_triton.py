"""Triton per-row e4m3 quantization: ``fp8_quant.quantize_rows``'s bits in one pass over the rows.

``quantize_row_block`` is the arithmetic, written once for every producer that quantizes a row it holds in
registers (this file's standalone kernel, and the RMSNorm that writes FP8 for the next projection,
``norms_triton``): ``amax`` = max |y| (exact in any order), ``scale = amax / 448`` correctly rounded (``div_rn``: the
GPU's default fp32 division is approximate), 1.0 for an all-zero row, ``q = y / scale`` correctly rounded, clamped
to +-448, cast round-to-nearest-even. A NaN anywhere in the row makes the scale and every code NaN, and an inf
makes the scale inf (``fp8_quant``'s rules): Triton's max reduction would skip NaN, so it is checked for apart.
One program per row: the codes and scale of a row never depend on another row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpreting
from .fp8_quant import FP8_DTYPE


@triton.jit
def _round_to_e4m3_grid(q):
    """fp32 ``q`` (|q| <= 448) rounded to nearest-even on the e4m3 grid, still in fp32: the spacing is 2^(e - 3)
    for a normal exponent e >= -6 and 2^-9 among subnormals; v = q / spacing (exact, a power of two) is rounded to
    an integer by the 1.5 * 2^23 trick (|v| <= 16; the fp32 adds round to nearest even). Used under the Triton
    interpreter, whose fp32 -> float8e4nv cast does not round to nearest (it turned 124.2 into 64); the cast of a
    value already on the grid is exact either way."""
    bits = q.to(tl.uint32, bitcast=True)
    e = ((bits >> 23) & 0xFF).to(tl.int32) - 127
    step_exp = tl.maximum(e, -6) - 3
    step = ((step_exp + 127).to(tl.uint32) << 23).to(tl.float32, bitcast=True)
    v = q / step
    r = (v + 12582912.0) - 12582912.0
    r = tl.where(r == 0.0, q * 0.0, r * step)  # a zero keeps q's sign (the trick's adds return +0)
    return tl.where(q != q, q, r)


@triton.jit
def scale_from_amax(amax):
    """``fp8_quant._scale_from_amax``: amax / 448 correctly rounded, 1.0 for zero (NaN stays NaN)."""
    return tl.where(amax == 0.0, 1.0, tl.math.div_rn(amax, 448.0))


@triton.jit
def block_amax(v, ok):
    """max |v| over the unmasked entries of a 1-D block, NaN if any is NaN (Triton's max would skip it)."""
    amax = tl.max(tl.where(ok, tl.abs(v), 0.0), 0)
    nan = tl.sum(tl.where(ok & (v != v), 1, 0), 0) > 0
    return tl.where(nan, float("nan"), amax)


@triton.jit
def quantize_row_block(y, ok, INTERPRETER: tl.constexpr = False):
    """(codes e4m3, fp32 scale) of the fp32 row ``y`` (a 1-D block; ``ok`` masks its columns)."""
    scale = scale_from_amax(block_amax(y, ok))
    return encode_row_block(y, scale, INTERPRETER), scale


@triton.jit
def encode_row_block(y, scale, INTERPRETER: tl.constexpr = False):
    """e4m3 codes of the fp32 row ``y`` under the fp32 ``scale``: y / scale correctly rounded, clamped, cast."""
    q = tl.math.div_rn(y, scale + tl.zeros_like(y))
    q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))  # NaN passes both compares unchanged
    if INTERPRETER:  # (its cast also turns NaN into 384: NaN codes are written as bits, 0x7F as torch's)
        codes = _round_to_e4m3_grid(q).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        codes = tl.where(q != q, 0x7F, codes).to(tl.uint8)
        return codes.to(tl.float8e4nv, bitcast=True)
    return q.to(tl.float8e4nv)


@triton.jit
def _quantize_rows(X, Q, S, s_x, K, BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_K)
    ok = cols < K
    y = tl.load(X + row * s_x + cols, mask=ok, other=0.0).to(tl.float32)
    q, scale = quantize_row_block(y, ok, INTERPRETER)
    tl.store(Q + row * K + cols, q, mask=ok)
    tl.store(S + row, scale)


def _warps(block: int) -> int:
    """Warps per row program from the row's width only (never from M)."""
    return 16 if block >= 16384 else 8 if block >= 2048 else 4


def row_quantizer_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row producer's input with unit column stride, and its outputs: codes (M, K) e4m3fn, scales (M,) fp32."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    return (x, torch.empty(m, k, dtype=FP8_DTYPE, device=x.device),
            torch.empty(m, dtype=torch.float32, device=x.device))


def quantize_rows_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) in a float dtype -> (codes (M, K) e4m3fn, scale (M,) fp32): ``fp8_quant.quantize_rows``'s bits."""
    x, q, s = row_quantizer_buffers(x)
    m, k = x.shape
    if m == 0:
        return q, s
    block = triton.next_power_of_2(k)
    _quantize_rows[(m,)](x, q, s, x.stride(0), k, BLOCK_K=block, INTERPRETER=triton_interpreting(),
                         num_warps=_warps(block))
    return q, s
