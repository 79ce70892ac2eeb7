"""FP8 routed GEMM for a few rows (AR text decoding): ``routed_gemm_fp8``'s contract, split over N only.

Why: the large FP8 kernels tile 128 rows by 128-256 columns, so one decode token (M = 1) leaves 14-18 programs to
stream a whole projection's weights (``down``: 14 programs reading 4.8 MB each) and most SMs idle. Decoding is
bound by the bytes of the weights, which FP8 halves only if every SM streams them. This is the bf16
``routed_gemm_small_batch``'s schedule on e4m3 weights: one program per 32 output columns holds all (at most
``SMALL_BATCH_ROWS``) rows and walks K.

Arithmetic: the e4m3 codes of both operands are widened to fp16 (exact: e4m3's 4-bit significands and exponents fit
fp16) and multiplied with fp32 accumulation — products exact, sums in fp32 (no FP8-MMA accumulator truncation, so
closer to the reference than either large kernel); then the large kernels' epilogue: row scale, channel scale,
bias, SwiGLU and residual with the bf16 roundings (``routed_gemm_fp8_triton``'s helpers). Exactness: the tile shape
and K step are fixed per (N, K) and a row's sum never involves another row, so a row's bits do not depend on M (<=
16) or its neighbours — but they are this kernel's own, not the large kernel's (as for bf16). Text decoding always
takes it (``small_batch=True``), so a decoded token's bits are the same alone, batched and on every rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpreting
from .routed_gemm_fp8_triton import _round, _scale, _swiglu, require_fp8_tensor_cores
from .routed_gemm_triton import SMALL_BATCH_ROWS, _add_bias, _pow2_at_least, _row_experts


def fp8_small_batch_tiles(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K), fixed per weight shape: 32 columns per program (144-1184 programs at BAGEL's
    projections), 256-wide K steps. The interpreter materializes BLOCK_M x BLOCK_N x BLOCK_K products: 64-wide K
    there (a row's sum order is this kernel's on the GPU either way; the interpreter is checked to rounding)."""
    return min(32, _pow2_at_least(n, 16)), min(64 if triton_interpreting() else 256, _pow2_at_least(k, 32))


@triton.jit
def _small_fp8_dot(XQ, WQ, rows, cols, wrow, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, INTERPRETER: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(XQ + rows[:, None].to(tl.int64) * K + kk[None, :], mask=(rows < M)[:, None] & (kk < K)[None, :],
                    other=0.0)
        b = tl.load(WQ + (wrow * N + cols[:, None]).to(tl.int64) * K + kk[None, :],
                    mask=(cols < N)[:, None] & (kk < K)[None, :], other=0.0)
        if INTERPRETER:  # position-independent broadcast-sum (e4m3 -> fp32 is exact, as is each product)
            acc += tl.sum(a.to(tl.float32)[:, :, None] * tl.trans(b.to(tl.float32))[None, :, :], 1)
        else:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16).T, acc)
    return acc


@triton.jit
def _routed_gemm_fp8_small_batch(
    XQ, XS, WQ, WS, OUT, RES, BIAS, IDS, M, N, K, s_om, s_rm,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INTERPRETER: tl.constexpr, BF16_BITS: tl.constexpr,
):
    P: tl.constexpr = 2 if SWIGLU else 1
    out_ty = OUT.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ids, lo, hi = _row_experts(IDS, rows, M, HAS_IDS, BLOCK_M)
    xs = tl.load(XS + rows, mask=rows < M, other=0.0)
    result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(lo, hi + 1):
        acc = _small_fp8_dot(XQ, WQ, rows, cols, e * P, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRETER)
        acc = _add_bias(_scale(acc, xs, WS, e * P, N, cols), BIAS, e * P, N, cols, HAS_BIAS)
        if SWIGLU:
            up = _small_fp8_dot(XQ, WQ, rows, cols, e * P + 1, M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, INTERPRETER)
            up = _add_bias(_scale(up, xs, WS, e * P + 1, N, cols), BIAS, e * P + 1, N, cols, HAS_BIAS)
            acc = _swiglu(acc, up, out_ty, BF16_BITS)
        result = tl.where((ids == e)[:, None], acc, result)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:  # residual + rounded projection, as eager's ``x + linear(h)``
        res = tl.load(RES + rows[:, None] * s_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        result = res + _round(result, out_ty, BF16_BITS)
    tl.store(OUT + rows[:, None] * s_om + cols[None, :], _round(result, out_ty, BF16_BITS).to(out_ty), mask=ok)


def routed_gemm_fp8_small_batch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None, expert_ids: torch.Tensor | None, swiglu: bool = False,
                                residual: torch.Tensor | None = None,
                                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``routed_gemm_fp8_triton``'s arguments for at most ``SMALL_BATCH_ROWS`` rows: xq (M, K) e4m3; x_scale (M,)
    fp32; wq (E, P, N, K) e4m3; w_scale (E, P, N) fp32; bias (E, P, N) or None; expert_ids (M,) int32 or None."""
    require_fp8_tensor_cores(xq.device)
    m, k = xq.shape
    e, p, n, _ = wq.shape
    if m > SMALL_BATCH_ROWS:
        raise ValueError(f"FP8 small-batch GEMM takes at most {SMALL_BATCH_ROWS} rows, got {m}")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    block_n, block_k = fp8_small_batch_tiles(n, k)
    res = residual.contiguous() if residual is not None else out
    _routed_gemm_fp8_small_batch[(triton.cdiv(n, block_n),)](
        xq.contiguous(), x_scale.contiguous(), wq.contiguous(), w_scale.contiguous(), out, res,
        bias.contiguous() if bias is not None else x_scale, expert_ids if expert_ids is not None else x_scale,
        m, n, k, out.stride(0), res.stride(0),
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=SMALL_BATCH_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, INTERPRETER=triton_interpreting(),
        BF16_BITS=triton_interpreting() and out_dtype == torch.bfloat16, num_warps=4, num_stages=4,
    )
    return out
