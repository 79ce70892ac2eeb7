"""FP8 routed GEMM for a few rows (AR text decoding): ``routed_gemm_fp8``'s contract, split over N only.

Why: the large FP8 kernels tile 128 rows by 128-256 columns, so one decode token (M = 1) leaves 14-18 programs to
stream a whole projection's weights (``down``: 14 programs reading 4.8 MB each) and most SMs idle. Decoding is
bound by the bytes of the weights, which FP8 halves only if every SM streams them. So this launches the bf16
decode kernel (``routed_gemm_triton._routed_gemm_small_batch``) with ``SCALED`` on: one program per 32 output
columns holds all (at most ``SMALL_BATCH_ROWS``) rows and walks K.

Arithmetic: the e4m3 codes of both operands are widened to fp16 (exact: e4m3's 4-bit significands and exponents fit
fp16) and multiplied with fp32 accumulation — products exact, sums in fp32 (no FP8-MMA accumulator truncation, so
closer to the reference than either large kernel); then the large FP8 kernels' epilogue: row scale, channel scale,
bias, SwiGLU and residual with the bf16 roundings (``_scale``, ``_swiglu_bits``, ``_round``). Exactness: the tile
shape and K step are fixed per (N, K) and a row's sum never involves another row, so a row's bits do not depend on
M (<= 16) or its neighbours — but they are this kernel's own, not the large kernel's (as for bf16). Text decoding
always takes it (``small_batch=True``), so a decoded token's bits are the same alone, batched and on every rank.
"""
from __future__ import annotations

import torch
import triton

from ._dispatch import triton_interpreting
from .routed_gemm_fp8_triton import require_fp8_tensor_cores
from .routed_gemm_triton import SMALL_BATCH_ROWS, _pow2_at_least, _routed_gemm_small_batch


def fp8_small_batch_tiles(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K), fixed per weight shape: 32 columns per program (112-1184 programs at BAGEL's
    projections), 256-wide K steps. Measured at one token on one H100 (2026-12-07, ``bench_fp8_gemm --parts
    decode``): 512-wide steps sum to the same time over a layer's four GEMMs (94.4 against 94.7 µs; down faster,
    gate/up slower), 8 warps and 16-wide N tiles are slower, and every variant gives the same bits. The interpreter
    materializes BLOCK_M x BLOCK_N x BLOCK_K products: 64-wide K there (a row's sum order is this kernel's on the
    GPU either way; the interpreter is checked to rounding)."""
    return min(32, _pow2_at_least(n, 16)), min(64 if triton_interpreting() else 256, _pow2_at_least(k, 32))


def routed_gemm_fp8_small_batch(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None, expert_ids: torch.Tensor | None, swiglu: bool = False,
                                residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                                block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                                num_stages: int = 4) -> torch.Tensor:
    """``routed_gemm_fp8_triton``'s arguments for at most ``SMALL_BATCH_ROWS`` rows: xq (M, K) e4m3; x_scale (M,)
    fp32; wq (E, P, N, K) e4m3; w_scale (E, P, N) fp32; bias (E, P, N) or None; expert_ids (M,) int32 or None.
    ``block_n`` / ``block_k`` / ``num_warps`` / ``num_stages`` override the fixed configuration (benchmarks compare
    them; any fixed one keeps a row's bits independent of the batch)."""
    require_fp8_tensor_cores(xq.device)
    m, k = xq.shape
    e, p, n, _ = wq.shape
    if m > SMALL_BATCH_ROWS:
        raise ValueError(f"FP8 small-batch GEMM takes at most {SMALL_BATCH_ROWS} rows, got {m}")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    default_n, default_k = fp8_small_batch_tiles(n, k)
    block_n = default_n if block_n is None else block_n
    block_k = default_k if block_k is None else block_k
    res = residual.contiguous() if residual is not None else out
    xq = xq.contiguous()
    _routed_gemm_small_batch[(triton.cdiv(n, block_n),)](
        xq, wq.contiguous(), x_scale.contiguous(), w_scale.contiguous(), out, res,
        bias.contiguous() if bias is not None else x_scale, expert_ids if expert_ids is not None else x_scale,
        m, n, k, xq.stride(0), out.stride(0), res.stride(0),
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=SMALL_BATCH_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC="tf32", INTERPRETER=triton_interpreting(),
        SCALED=True, BF16_BITS=triton_interpreting() and out_dtype == torch.bfloat16, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
