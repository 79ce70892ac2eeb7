"""Triton batch-invariant, expert-routed GEMM: ``out[r] = act(x[r] @ W[e(r)].T + b[e(r)]) (+ residual[r])``.

Persistent grid (one program per SM) over (BLOCK_M x BLOCK_N) output tiles; operands arrive through TMA tensor
descriptors. The expert of each row is read on the device from ``expert_ids``: a tile whose rows all belong to one
expert runs one K loop, a tile that straddles the und/gen boundary runs the K loop once per expert present and keeps
each row's own result. A row's arithmetic is therefore the same K loop over the same tile shape whatever M is,
whichever rows share its tile and however they are routed — the batch-invariance the exactness contract needs.
Tile shapes, the K step, warps and stages are fixed per (N, K, dtype, activation) by ``gemm_config``; never from M.

Weights are stacked per expert: ``W`` is (E, P, N, K) where P = 1 for a plain linear and P = 2 for SwiGLU
(gate, up), whose epilogue computes ``silu(gate) * up`` with the same roundings as the eager reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._dispatch import triton_interpreting
from ._launch import _num_programs


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


def _pow2_at_least(n: int, lo: int) -> int:
    return max(lo, 1 << (max(1, n) - 1).bit_length())


def gemm_config(n: int, k: int, dtype: torch.dtype, swiglu: bool) -> GemmConfig:
    """The one launch configuration for a weight of shape (N, K) — a pure function of (N, K, dtype, activation).

    Why not autotune: an autotuner picks per problem size, so a row's bits would depend on M (or on the rank's share
    of the tokens). These were chosen for BAGEL's projections on Hopper and stay put."""
    if dtype == torch.float32:
        return GemmConfig(64, min(64, _pow2_at_least(n, 16)), 32, 8, 4, 2)
    # The interpreter's position-independent dot materializes BLOCK_M x BLOCK_K x BLOCK_N products and Triton caps
    # a tensor at 2^20 elements: it runs 128-wide N tiles. BLOCK_N does not enter any output element's arithmetic
    # (each is its own K loop with a fixed BLOCK_K), so the bits are those of the GPU's 256-wide tiles.
    bn = 128 if swiglu or triton_interpreting() else 256
    bn = min(bn, _pow2_at_least(n, 16))
    bk = min(64, _pow2_at_least(k, 16))
    return GemmConfig(128, bn, bk, 8, 8, 4 if swiglu else 3)


@triton.jit
def _tile_dot(x_desc, w_desc, m0, n0, wrow, K, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRETER: tl.constexpr):
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([m0, kk * BLOCK_K])
        b = w_desc.load([wrow, n0, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
        if INTERPRETER:
            # The interpreter's tl.dot is numpy matmul, whose bits depend on a row's position in the block (BLAS
            # micro-tiles) and which mishandles 16-bit operands. A broadcast-and-sum is position-independent,
            # like the GPU's MMA, so CPU tests can check the batch invariance the GPU kernel has.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * tl.trans(b.to(tl.float32))[None, :, :], 1)
        else:
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _row_experts(IDS, rows, M, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert id per row of a tile and the lowest/highest expert present (one K loop per expert in [lo, hi])."""
    if HAS_IDS:
        ids = tl.load(IDS + rows, mask=rows < M, other=0)
        return ids, tl.min(tl.where(rows < M, ids, 1 << 20)), tl.max(tl.where(rows < M, ids, -1))
    else:
        return tl.zeros((BLOCK_M,), dtype=tl.int32), 0, 0


@triton.jit
def _add_bias(acc, BIAS, wrow, N, cols, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(BIAS + wrow * N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _swiglu(gate, up, out_ty: tl.constexpr):
    """Same roundings as eager: gate and up land in the activation dtype, silu(gate) is rounded, then the product."""
    g = gate.to(out_ty).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(out_ty).to(tl.float32)
    return s * up.to(out_ty).to(tl.float32)


@triton.jit
def grouped_tile_origin(tile, num_m, num_n, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """First row and column of output tile ``tile`` in grouped order: GROUP_M row tiles sweep the column tiles
    together, so consecutive programs share weight tiles in L2 (the bf16 and FP8 Triton kernels both draw tiles
    this way)."""
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % size_m
    pid_n = (tile % per_group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def _routed_gemm(
    x_desc, w_desc, out_desc, res_desc, BIAS, IDS, COUNTER,
    M, N, K,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRETER: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    out_ty = out_desc.dtype
    P: tl.constexpr = 2 if SWIGLU else 1
    num_tiles = num_m * num_n
    # Dynamic tile queue: a tile that straddles the und/gen boundary costs two K loops, and with a static
    # round-robin the programs that drew such tiles set the end time for everyone; a queue lets the others take
    # more tiles meanwhile. Which program computes a tile never changes the tile's arithmetic, so bits do not
    # depend on it.
    tile = tl.atomic_add(COUNTER, 1)
    while tile < num_tiles:
        m0, n0 = grouped_tile_origin(tile, num_m, num_n, GROUP_M, BLOCK_M, BLOCK_N)
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        ids, lo, hi = _row_experts(IDS, rows, M, HAS_IDS, BLOCK_M)
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(lo, hi + 1):  # one pass, or two for a tile across the und/gen boundary
            acc = _tile_dot(x_desc, w_desc, m0, n0, e * P, K, BLOCK_K, BLOCK_M, BLOCK_N, DOT_PREC, INTERPRETER)
            acc = _add_bias(acc, BIAS, e * P, N, cols, HAS_BIAS)
            if SWIGLU:
                up = _tile_dot(x_desc, w_desc, m0, n0, e * P + 1, K, BLOCK_K, BLOCK_M, BLOCK_N, DOT_PREC, INTERPRETER)
                acc = _swiglu(acc, _add_bias(up, BIAS, e * P + 1, N, cols, HAS_BIAS), out_ty)
            result = tl.where((ids == e)[:, None], acc, result)
        if HAS_RES:  # residual + rounded projection, as eager's ``x + linear(h)``
            res = res_desc.load([m0, n0]).to(tl.float32)
            result = res + result.to(out_ty).to(tl.float32)
        out_desc.store([m0, n0], result.to(out_ty))
        tile = tl.atomic_add(COUNTER, 1)


def routed_gemm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (M, K); weight (E, P, N, K) contiguous; bias (E, P, N) or None; expert_ids (M,) int32 on x's device."""
    m, k = x.shape
    e, p, n, k2 = weight.shape
    cfg = gemm_config(n, k, x.dtype, swiglu)
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x.contiguous()
    x_desc = TensorDescriptor.from_tensor(x, [cfg.BLOCK_M, cfg.BLOCK_K])
    w_desc = TensorDescriptor.from_tensor(weight.view(e * p, n, k), [1, cfg.BLOCK_N, cfg.BLOCK_K])
    out_desc = TensorDescriptor.from_tensor(out, [cfg.BLOCK_M, cfg.BLOCK_N])
    res_desc = TensorDescriptor.from_tensor(residual, [cfg.BLOCK_M, cfg.BLOCK_N]) if residual is not None else out_desc
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    progs = _num_programs(x.device, tiles)
    _routed_gemm[(progs,)](
        x_desc, w_desc, out_desc, res_desc,
        bias if bias is not None else x, expert_ids if expert_ids is not None else x,
        torch.zeros(1, dtype=torch.int32, device=x.device), m, n, k,
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        INTERPRETER=triton_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out


# ---- the FP8 epilogue pieces (``routed_gemm_fp8_triton``; the small-batch kernel below too) ----

@triton.jit
def _round(x, out_ty: tl.constexpr, BF16_BITS: tl.constexpr):
    """fp32 -> out_ty (round to nearest even) -> fp32. The GPU's cvt rounds to nearest even; Triton 3.6's
    interpreter truncates fp32 -> bf16 (and its "rtne" mode rounds ties away without carrying into the exponent),
    so under the interpreter with a bf16 output (BF16_BITS, set by the host) the rounding is done on the bits: add
    0x7FFF plus the kept LSB, clear the low half. NaN is kept as is (the add could carry a NaN payload into inf)."""
    if BF16_BITS:
        bits = x.to(tl.uint32, bitcast=True)
        r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    else:
        return x.to(out_ty).to(tl.float32)


@triton.jit
def _swiglu_bits(gate, up, out_ty: tl.constexpr, BF16_BITS: tl.constexpr):
    """``_swiglu``'s roundings (gate and up land in the output dtype, silu(gate) is rounded, then the product,
    rounded by the caller), each through ``_round`` so that the interpreter rounds bf16 as the GPU does."""
    g = _round(gate, out_ty, BF16_BITS)
    s = _round(g / (1.0 + tl.exp(-g)), out_ty, BF16_BITS)
    return s * _round(up, out_ty, BF16_BITS)


@triton.jit
def _scale(acc, xs, WS, wrow, N, cols):
    """acc * row scale * channel scale, in that order (the reference's)."""
    ws = tl.load(WS + wrow * N + cols, mask=cols < N, other=0.0)
    return acc * xs[:, None] * ws[None, :]


# ---- few rows (AR decode): split over N only, every row in one 16-row tile ----
SMALL_BATCH_ROWS = 16


def small_batch_config(n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """Fixed per (N, K, dtype) like ``gemm_config``. Narrow N tiles so that a one-token GEMM still spreads the weight
    stream over every SM (the persistent 128 x 256 tiles leave 18 programs for the QKV projection at M = 1)."""
    if dtype == torch.float32:
        return GemmConfig(SMALL_BATCH_ROWS, min(32, _pow2_at_least(n, 16)), min(64, _pow2_at_least(k, 16)), 1, 4, 3)
    return GemmConfig(SMALL_BATCH_ROWS, min(32, _pow2_at_least(n, 16)), min(256, _pow2_at_least(k, 16)), 1, 4, 4)


@triton.jit
def _small_tile_dot(X, W, s_xm, rows, cols, wrow, M, N, K, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, INTERPRETER: tl.constexpr,
                    WIDEN: tl.constexpr = False):
    """WIDEN (e4m3 operands): both tiles are widened to fp16 before the MMA — exact (e4m3's significands and
    exponents fit fp16), so the products are exact and the sums fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(X + rows[:, None].to(tl.int64) * s_xm + kk[None, :], mask=(rows < M)[:, None] & (kk < K)[None, :],
                    other=0.0)
        b = tl.load(W + (wrow * N + cols[:, None]).to(tl.int64) * K + kk[None, :],
                    mask=(cols < N)[:, None] & (kk < K)[None, :], other=0.0)
        if INTERPRETER:  # position-independent broadcast-sum, as in _tile_dot
            acc += tl.sum(a.to(tl.float32)[:, :, None] * tl.trans(b.to(tl.float32))[None, :, :], 1)
        elif WIDEN:
            acc = tl.dot(a.to(tl.float16), b.to(tl.float16).T, acc)
        else:
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _routed_gemm_small_batch(
    X, W, XS, WS, OUT, RES, BIAS, IDS, M, N, K, s_xm, s_om, s_rm,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PREC: tl.constexpr, INTERPRETER: tl.constexpr, SCALED: tl.constexpr = False, BF16_BITS: tl.constexpr = False,
):
    """SCALED: e4m3 operands with per-row (XS) and per-channel (WS) scales and the FP8 kernels' epilogue
    (``routed_gemm_fp8_small_batch``); off, the bf16 decode GEMM (its instructions are the same as before SCALED
    existed: every SCALED branch is a constexpr one)."""
    P: tl.constexpr = 2 if SWIGLU else 1
    out_ty = OUT.dtype.element_ty
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ids, lo, hi = _row_experts(IDS, rows, M, HAS_IDS, BLOCK_M)
    if SCALED:
        xs = tl.load(XS + rows, mask=rows < M, other=0.0)
    result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for e in range(lo, hi + 1):
        acc = _small_tile_dot(X, W, s_xm, rows, cols, e * P, M, N, K, BLOCK_K, BLOCK_M, BLOCK_N, DOT_PREC, INTERPRETER,
                              SCALED)
        if SCALED:
            acc = _scale(acc, xs, WS, e * P, N, cols)
        acc = _add_bias(acc, BIAS, e * P, N, cols, HAS_BIAS)
        if SWIGLU:
            up = _small_tile_dot(X, W, s_xm, rows, cols, e * P + 1, M, N, K, BLOCK_K, BLOCK_M, BLOCK_N, DOT_PREC,
                                 INTERPRETER, SCALED)
            if SCALED:
                up = _scale(up, xs, WS, e * P + 1, N, cols)
            # (BF16_BITS is off outside the interpreter's FP8 launches: _swiglu's and _round's plain casts then)
            acc = _swiglu_bits(acc, _add_bias(up, BIAS, e * P + 1, N, cols, HAS_BIAS), out_ty, BF16_BITS)
        result = tl.where((ids == e)[:, None], acc, result)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    if HAS_RES:
        res = tl.load(RES + rows[:, None] * s_rm + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        result = res + _round(result, out_ty, BF16_BITS)
    if SCALED:
        tl.store(OUT + rows[:, None] * s_om + cols[None, :], _round(result, out_ty, BF16_BITS).to(out_ty), mask=ok)
    else:
        tl.store(OUT + rows[:, None] * s_om + cols[None, :], result.to(out_ty), mask=ok)


def routed_gemm_small_batch_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                   expert_ids: torch.Tensor | None, swiglu: bool = False,
                                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """``routed_gemm_triton`` for at most ``SMALL_BATCH_ROWS`` rows (AR decode). Rows stay independent of each other
    and of M (<= 16) — but their bits are those of this kernel, not of the large one."""
    m, k = x.shape
    e, p, n, _ = weight.shape
    if m > SMALL_BATCH_ROWS:
        raise ValueError(f"small-batch GEMM takes at most {SMALL_BATCH_ROWS} rows, got {m}")
    cfg = small_batch_config(n, k, x.dtype)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    x = x.contiguous()
    res = residual if residual is not None else out
    _routed_gemm_small_batch[(triton.cdiv(n, cfg.BLOCK_N),)](
        x, weight, x, x, out, res, bias if bias is not None else x, expert_ids if expert_ids is not None else x,
        m, n, k, x.stride(0), out.stride(0), res.stride(0),
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", INTERPRETER=triton_interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
