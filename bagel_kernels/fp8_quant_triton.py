"""Triton per-row e4m3 quantization: ``fp8_quant.quantize_rows``'s bits, one program per row.

``quantize_row_block`` is the arithmetic, written once for every producer that quantizes a row it holds in
registers (this file's standalone kernel, and the RMSNorm that writes FP8 for the next projection,
``norms_triton``): ``amax`` = max |y| (exact in any order), ``scale = amax / 448`` correctly rounded (``div_rn``: the
GPU's default fp32 division is approximate), 1.0 for an all-zero row, ``q = y / scale`` correctly rounded, clamped
to +-448, cast round-to-nearest-even. A NaN anywhere in
the row makes the scale and every code NaN, and an inf makes the scale inf (``fp8_quant``'s rules): Triton's max
reduction would skip NaN, so it is checked for apart.
One program per row: the codes and scale of a row never depend on another row (nor on the piece width the
standalone kernel walks the row in).
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
def _clamp_cast(q, INTERPRETER: tl.constexpr = False):
    """fp32 quotients -> e4m3 codes: clamped to +-448, cast round-to-nearest-even (monotonic in q)."""
    q = tl.where(q > 448.0, 448.0, tl.where(q < -448.0, -448.0, q))  # NaN passes both compares unchanged
    if INTERPRETER:  # (its cast also turns NaN into 384: NaN codes are written as bits, 0x7F as torch's)
        codes = _round_to_e4m3_grid(q).to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        codes = tl.where(q != q, 0x7F, codes).to(tl.uint8)
        return codes.to(tl.float8e4nv, bitcast=True)
    return q.to(tl.float8e4nv)


@triton.jit
def encode_row_block(y, scale, INTERPRETER: tl.constexpr = False):
    """e4m3 codes of the fp32 row ``y`` under the fp32 ``scale``: y / scale correctly rounded (``div_rn``: the GPU's
    default fp32 division is approximate), clamped, cast. (An encode by multiplication with ``1 / scale`` and a
    bracket check was tried and removed: on an H100 it ran 0.70-0.85x the division's GB/s and its codes were not
    the division's; benchmarks/RESULTS.md.)"""
    return _clamp_cast(tl.math.div_rn(y, scale + tl.zeros_like(y)), INTERPRETER)


@triton.jit
def _quantize_rows(X, Q, S, s_x, K, CHUNK: tl.constexpr, INTERPRETER: tl.constexpr):
    """One row in CHUNK-wide pieces, twice: the amax pass, then the encode pass (the row is still in L2). A row
    held whole in registers (a power-of-two block: 32768 lanes for BAGEL's 18944-wide down input, 42 % of them
    masked) leaves one program per SM waiting on its loads; chunks keep several rows in flight. The amax is an
    elementwise running max reduced once (exact in any order) and the NaN count is kept apart, as in
    ``block_amax``: the same scale and codes for any CHUNK."""
    row = tl.program_id(0)
    cols = tl.arange(0, CHUNK)
    base = X + row.to(tl.int64) * s_x
    run_max = tl.zeros([CHUNK], dtype=tl.float32)
    nans = tl.zeros([CHUNK], dtype=tl.int32)
    for k0 in range(0, K, CHUNK):
        ok = k0 + cols < K
        y = tl.load(base + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        nan = y != y
        run_max = tl.maximum(run_max, tl.where(nan, 0.0, tl.abs(y)))
        nans += tl.where(nan, 1, 0)
    amax = tl.where(tl.sum(nans, 0) > 0, float("nan"), tl.max(run_max, 0))
    scale = scale_from_amax(amax)
    out = Q + row.to(tl.int64) * K
    for k0 in range(0, K, CHUNK):
        ok = k0 + cols < K
        y = tl.load(base + k0 + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(out + k0 + cols, encode_row_block(y, scale, INTERPRETER), mask=ok)
    tl.store(S + row, scale)


@triton.jit
def _quantize_rows_resident(X, Q, S, s_x, K, MAIN: tl.constexpr, TAIL: tl.constexpr, INTERPRETER: tl.constexpr):
    """One row held in registers as two blocks, read from memory once: the largest power of two <= K (MAIN) and
    the rest (TAIL, a power of two >= K - MAIN; 0 when K is a power of two). Down's 18944-wide input is 16384 +
    2560 in 20480 lanes, where one power-of-two block would take 32768. The same arithmetic as the piece-wise
    kernel (elementwise max, NaN counted apart): the same scale and codes."""
    row = tl.program_id(0)
    base = X + row.to(tl.int64) * s_x
    out = Q + row.to(tl.int64) * K
    cols = tl.arange(0, MAIN)
    y = tl.load(base + cols).to(tl.float32)
    amax = block_amax(y, cols < MAIN)
    if TAIL > 0:
        tcols = MAIN + tl.arange(0, TAIL)
        tok = tcols < K
        yt = tl.load(base + tcols, mask=tok, other=0.0).to(tl.float32)
        amax_t = block_amax(yt, tok)
        amax = tl.where((amax != amax) | (amax_t != amax_t), float("nan"), tl.maximum(amax, amax_t))
    scale = scale_from_amax(amax)
    tl.store(out + cols, encode_row_block(y, scale, INTERPRETER))
    if TAIL > 0:
        tl.store(out + tcols, encode_row_block(yt, scale, INTERPRETER), mask=tok)
    tl.store(S + row, scale)


def resident_blocks(k: int) -> tuple[int, int]:
    """(MAIN, TAIL) of ``_quantize_rows_resident`` for a row of ``k`` columns."""
    main = 1 << (k.bit_length() - 1)
    return main, (0 if k == main else triton.next_power_of_2(k - main))


def quantizer_chunk(k: int) -> int:
    """The standalone quantizer's piece width, from the row width only (never from M): 1024-wide pieces (4 warps)
    up to 4096 columns, else 2048-wide (8 warps). Measured at the 1024² step's 8200 rows (one H100, 2026-12-07,
    ``bench_fp8_gemm``): o_proj's 3584-wide input 1903 GB/s in 1024-wide pieces against 1262 as one 4096-wide piece
    (16 warps) and 1735 held in registers; down's 18944-wide input 2155 GB/s in 2048-wide pieces, 2195 in 4096, 1726
    in 1024, 1819 held in registers (a plain e4m3 cast of the same tensors: 2837 and 2963)."""
    return min(triton.next_power_of_2(k), 1024) if k <= 4096 else 2048


def _warps(lanes: int) -> int:
    """Warps per row program from its lane count only (never from M): 8 elements per thread at most, a power of
    two (Triton's launch needs one; the resident kernel's lanes, a power of two plus a smaller one, are not)."""
    return max(1, min(16, 1 << max(0, (lanes // 256).bit_length() - 1)))


def row_quantizer_buffers(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A row producer's input with unit column stride, and its outputs: codes (M, K) e4m3fn, scales (M,) fp32."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    return (x, torch.empty(m, k, dtype=FP8_DTYPE, device=x.device),
            torch.empty(m, dtype=torch.float32, device=x.device))


def quantize_rows_triton(x: torch.Tensor, chunk: int | None = None, num_warps: int | None = None,
                         resident: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) in a float dtype -> (codes (M, K) e4m3fn, scale (M,) fp32): ``fp8_quant.quantize_rows``'s bits
    for any ``chunk`` (a power of two; default ``quantizer_chunk(K)``) and ``num_warps`` (benchmarks sweep them).
    ``resident=True``: the row held in registers and read once (``_quantize_rows_resident``; ``chunk`` unused)."""
    x, q, s = row_quantizer_buffers(x)
    m, k = x.shape
    if m == 0:
        return q, s
    if resident:
        main, tail = resident_blocks(k)
        _quantize_rows_resident[(m,)](x, q, s, x.stride(0), k, MAIN=main, TAIL=tail,
                                      INTERPRETER=triton_interpreting(),
                                      num_warps=_warps((main + tail) // 2) if num_warps is None else num_warps)
        return q, s
    chunk = quantizer_chunk(k) if chunk is None else chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"quantize_rows_triton: chunk must be a power of two >= 16, got {chunk}")
    _quantize_rows[(m,)](x, q, s, x.stride(0), k, CHUNK=chunk, INTERPRETER=triton_interpreting(),
                         num_warps=_warps(chunk) if num_warps is None else num_warps)
    return q, s
