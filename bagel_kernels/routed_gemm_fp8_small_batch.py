"""FP8 routed GEMM for a few rows (AR text decoding): ``routed_gemm_fp8``'s contract, split over N only.

Why: the large FP8 kernels tile 128 rows by 128-256 columns, so one decode token (M = 1) leaves 14-18 programs to
stream a whole projection's weights (``down``: 14 programs reading 4.8 MB each) and most SMs idle. Decoding is
bound by the bytes of the weights, which FP8 halves only if every SM streams them. So this launches the bf16
decode kernel (``routed_gemm_triton._routed_gemm_small_batch``) with ``SCALED`` on: one program per 32 output
columns holds all (at most ``SMALL_BATCH_ROWS``) rows and walks K.

Arithmetic: the e4m3 codes of both operands are widened to fp16 (exact: e4m3's 4-bit significands and exponents fit
fp16) and multiplied with fp32 accumulation — products exact, sums in fp32 (no FP8-MMA accumulator truncation, so
closer to the reference than either large kernel); then the large FP8 kernels' epilogue: row scale, channel scale,
bias, SwiGLU and residual with the bf16 roundings (``_scale``, ``_swiglu_bits``, ``_round``).

Weight-only (``x_scale=None``, what text decoding runs): the activation stays bf16 — the weight tile is widened to
bf16 (exact too) and the sum takes the channel scale alone. Decoding streams weights; quantizing its one row per
token bought nothing but a standalone quantizer launch before o_proj and down and the quantizing RMSNorm's extra
pass (≈ 0.6 ms of a token's 4.5 ms of kernels on one H100), and cost the activation's e4m3 rounding. Exactness: the tile
shape and K step are fixed per (N, K) and a row's sum never involves another row, so a row's bits do not depend on
M (<= 16) or its neighbours — but they are this kernel's own, not the large kernel's (as for bf16). Text decoding
always takes it (``small_batch=True``), so a decoded token's bits are the same alone, batched and on every rank.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpreting
from .routed_gemm_fp8_triton import require_fp8_tensor_cores
from .routed_gemm_triton import (SMALL_BATCH_ROWS, _add_bias, _pow2_at_least, _round, _routed_gemm_small_batch,
                                 _row_experts, _scale, _small_tile_dot_range, _swiglu_bits)

# Per-device column-tile counters of the split-K kernel: allocated once and never replaced (a captured CUDA graph
# keeps their address), each left at zero by the launch that used it. Launches on one stream only (text decoding).
_COUNTERS = 4096
_counters: dict[torch.device, torch.Tensor] = {}


def _tile_counters(device: torch.device, tiles: int) -> torch.Tensor:
    if tiles > _COUNTERS:
        raise ValueError(f"split-K small-batch GEMM: {tiles} column tiles, at most {_COUNTERS}")
    if device not in _counters:
        _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


def fp8_small_batch_tiles(n: int, k: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K), fixed per weight shape: 32 columns per program (112-1184 programs at BAGEL's
    projections), 256-wide K steps. Measured at one token on one H100 (2026-12-07, ``bench_fp8_gemm --parts
    decode``): 512-wide steps sum to the same time over a layer's four GEMMs (94.4 against 94.7 µs; down faster,
    gate/up slower), 8 warps and 16-wide N tiles are slower, and every variant gives the same bits. The interpreter
    materializes BLOCK_M x BLOCK_N x BLOCK_K products: 64-wide K there (a row's sum order is this kernel's on the
    GPU either way; the interpreter is checked to rounding)."""
    return min(32, _pow2_at_least(n, 16)), min(64 if triton_interpreting() else 256, _pow2_at_least(k, 32))


def fp8_small_batch_split(n: int, k: int) -> int:
    """SPLIT_K, fixed per weight shape: 1 (the whole K loop in one program) until a measured split is faster."""
    return 1


def routed_gemm_fp8_small_batch(xq: torch.Tensor, x_scale: torch.Tensor | None, wq: torch.Tensor,
                                w_scale: torch.Tensor,
                                bias: torch.Tensor | None, expert_ids: torch.Tensor | None, swiglu: bool = False,
                                residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
                                block_n: int | None = None, block_k: int | None = None, num_warps: int = 4,
                                num_stages: int = 4, split_k: int | None = None) -> torch.Tensor:
    """``routed_gemm_fp8_triton``'s arguments for at most ``SMALL_BATCH_ROWS`` rows: xq (M, K) e4m3; x_scale (M,)
    fp32; wq (E, P, N, K) e4m3; w_scale (E, P, N) fp32; bias (E, P, N) or None; expert_ids (M,) int32 or None.
    ``x_scale=None``: weight-only — ``xq`` is the activation in ``out_dtype`` (not quantized), the weight tile is
    widened to that dtype (exact) and the sum takes the channel scale alone (what text decoding runs).
    ``block_n`` / ``block_k`` / ``num_warps`` / ``num_stages`` / ``split_k`` override the fixed configuration
    (benchmarks compare them; any fixed one keeps a row's bits independent of the batch; the K split changes the
    sum's order, so its bits)."""
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
    xq, ws = xq.contiguous(), w_scale.contiguous()
    xs = x_scale.contiguous() if x_scale is not None else ws  # (weight-only: XS is not read)
    split = fp8_small_batch_split(n, k) if split_k is None else split_k
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    if split > 1:
        tiles = triton.cdiv(n, block_n)
        part = torch.empty(split, p, SMALL_BATCH_ROWS, n, dtype=torch.float32, device=xq.device)
        _fp8_small_batch_split_k[(tiles, split)](
            xq, wq.contiguous(), xs, ws, out, res,
            bias.contiguous() if bias is not None else ws, expert_ids if expert_ids is not None else ws,
            part, _tile_counters(xq.device, tiles), m, n, k, xq.stride(0), out.stride(0), res.stride(0),
            HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
            BLOCK_M=SMALL_BATCH_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
            INTERPRETER=triton_interpreting(), BF16_BITS=triton_interpreting() and out_dtype == torch.bfloat16,
            X_CODES=x_scale is not None, num_warps=num_warps, num_stages=num_stages,
        )
        return out
    _routed_gemm_small_batch[(triton.cdiv(n, block_n),)](
        xq, wq.contiguous(), xs, ws, out, res,
        bias.contiguous() if bias is not None else ws, expert_ids if expert_ids is not None else ws,
        m, n, k, xq.stride(0), out.stride(0), res.stride(0),
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=SMALL_BATCH_ROWS, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PREC="tf32", INTERPRETER=triton_interpreting(),
        SCALED=True, BF16_BITS=triton_interpreting() and out_dtype == torch.bfloat16, X_CODES=x_scale is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


# ---- split over K too (weights with few output columns: o_proj, down, qkv) ----

@triton.jit
def _fp8_small_batch_split_k(
    X, W, XS, WS, OUT, RES, BIAS, IDS, PART, LOCK, M, N, K, s_xm, s_om, s_rm,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    INTERPRETER: tl.constexpr, BF16_BITS: tl.constexpr, X_CODES: tl.constexpr,
):
    """``_routed_gemm_small_batch`` (SCALED) with the K range split in SPLIT_K fixed chunks: program (n, j) sums
    chunk j of column tile n and stores that fp32 partial (per part, each row's own expert's) in PART; the tile's
    last program to finish (a per-tile counter in LOCK, reset by it for the next launch) adds the SPLIT_K partials
    in chunk order — whichever program finishes last, the same sums in the same order — and runs the epilogue."""
    P: tl.constexpr = 2 if SWIGLU else 1
    out_ty = OUT.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ids, lo, hi = _row_experts(IDS, rows, M, HAS_IDS, BLOCK_M)
    per = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # K steps per chunk, fixed by (K, BLOCK_K, SPLIT_K)
    k_lo = pid_k * per
    k_hi = tl.minimum(K, k_lo + per)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(lo, hi + 1):
        a = _small_tile_dot_range(X, W, s_xm, rows, cols, e * P, M, N, K, k_lo, k_hi, BLOCK_K, BLOCK_M, BLOCK_N,
                                  "tf32", INTERPRETER, True, X_CODES)
        gate = tl.where((ids == e)[:, None], a, gate)
        if SWIGLU:
            b = _small_tile_dot_range(X, W, s_xm, rows, cols, e * P + 1, M, N, K, k_lo, k_hi, BLOCK_K, BLOCK_M,
                                      BLOCK_N, "tf32", INTERPRETER, True, X_CODES)
            up = tl.where((ids == e)[:, None], b, up)
    in_n = (cols < N)[None, :]
    mine = PART + ((pid_k * P) * BLOCK_M + rows[:, None]) * N + cols[None, :]
    tl.store(mine, gate, mask=in_n)
    if SWIGLU:
        tl.store(mine + BLOCK_M * N, up, mask=in_n)
    tl.debug_barrier()  # every thread's partial is stored before the counter says so (release, GPU scope)
    if tl.atomic_add(LOCK + pid_n, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(SPLIT_K):  # chunk order, from L2 (".cg": other SMs wrote them)
            src = PART + ((j * P) * BLOCK_M + rows[:, None]) * N + cols[None, :]
            gate += tl.load(src, mask=in_n, other=0.0, cache_modifier=".cg")
            if SWIGLU:
                up += tl.load(src + BLOCK_M * N, mask=in_n, other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(LOCK + pid_n, 0)  # ready for the next launch (a CUDA graph replays this one)
        xs = rows  # (unused placeholder unless X_CODES)
        if X_CODES:
            xs = tl.load(XS + rows, mask=rows < M, other=0.0)
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(lo, hi + 1):
            acc = _add_bias(_scale(gate, xs, WS, e * P, N, cols, X_CODES), BIAS, e * P, N, cols, HAS_BIAS)
            if SWIGLU:
                u = _add_bias(_scale(up, xs, WS, e * P + 1, N, cols, X_CODES), BIAS, e * P + 1, N, cols, HAS_BIAS)
                acc = _swiglu_bits(acc, u, out_ty, BF16_BITS)
            result = tl.where((ids == e)[:, None], acc, result)
        ok = (rows < M)[:, None] & in_n
        if HAS_RES:
            res = tl.load(RES + rows[:, None] * s_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            result = res + _round(result, out_ty, BF16_BITS)
        tl.store(OUT + rows[:, None] * s_om + cols[None, :], _round(result, out_ty, BF16_BITS).to(out_ty), mask=ok)
