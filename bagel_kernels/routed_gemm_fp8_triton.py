"""Triton batch-invariant FP8 routed GEMM: ``out[r] = act((xq[r] @ wq[e(r)].T) * xs[r] * ws[e(r)] + b[e(r)])
(+ residual[r])`` on e4m3 codes with fp32 per-row (activation) and per-output-channel (weight) scales.

Same schedule and routing as the bf16 kernel (``routed_gemm_triton``): a persistent grid draws (BLOCK_M x BLOCK_N)
output tiles from an atomic queue; each row's expert is read on the device from ``expert_ids``; a tile that
straddles the und/gen boundary runs the K loop once per expert present and keeps each row's own result. The
operands feed Hopper's FP8 tensor cores (``tl.dot`` on float8e4nv, fp32 accumulation); both scales are applied once,
in the epilogue, as ``acc * xs[:, None] * ws[None, :]`` — per-row and per-column factors, so no row's arithmetic
involves another row. With the tile shape, K step and accumulation mode fixed per (N, K, activation) by
``fp8_gemm_config`` (never from M) and no split-K, a row's output bits do not depend on M or on its neighbours.

Accumulation precision: Hopper's FP8 MMA keeps fewer than fp32's bits while it accumulates (DeepSeek-V3 measured
about 14 bits on long K). ``precise_acc`` promotes the running sum to a true fp32 add after every BLOCK_K = 128
products (Triton's ``max_num_imprecise_acc``, DeepSeek's scheme); without it the whole K loop stays in the MMA's
accumulator, like ``torch._scaled_mm(use_fast_accum=True)``. Either way the arithmetic is fixed per weight shape.

SwiGLU (gate_up) runs one K loop that loads the gate and the up weight tiles of the same columns beside one
activation tile, and combines them in the epilogue with the bf16 kernel's roundings.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._dispatch import triton_interpreting
from ._launch import _num_programs
from .routed_gemm_triton import (_add_bias, _pow2_at_least, _round, _row_experts, _scale,
                                 _swiglu_bits as _swiglu, grouped_tile_origin)

FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores; Ampere and older do not


@dataclass(frozen=True)
class Fp8GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int
    precise_acc: bool


def fp8_gemm_config(n: int, k: int, swiglu: bool) -> Fp8GemmConfig:
    """The one launch configuration for an FP8 weight of shape (N, K): a pure function of (N, K, activation).

    Not autotuned: an autotuner picks per problem size, so a row's bits would follow M. 128 x 256 x 128 with 8 warps
    and 3 stages: 48 KiB of operands per stage, 3 stages plus the 64 KiB bf16 output tile fit Hopper's 227 KiB of
    shared memory. SwiGLU loads two weight tiles per K step, so its N tile is 128 (same shared memory per stage).
    The interpreter materializes BLOCK_M x BLOCK_K x BLOCK_N products, capped at 2^20 elements: 64-wide N tiles
    there (BLOCK_N enters no output element's arithmetic)."""
    bn = 64 if triton_interpreting() else (128 if swiglu else 256)
    bn = min(bn, _pow2_at_least(n, 16))
    bk = min(128, _pow2_at_least(k, 32))
    return Fp8GemmConfig(128, bn, bk, 8, 8, 3, True)


def require_fp8_tensor_cores(device: torch.device) -> None:
    """Raise, naming the GPU, when ``device`` cannot run FP8 tensor-core MMAs (compute capability < 8.9)."""
    if device.type != "cuda":
        return
    cap = torch.cuda.get_device_capability(device)
    if tuple(cap) < FP8_MIN_CAPABILITY:
        raise RuntimeError(
            f"routed_gemm_fp8: {torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}) has no FP8 "
            f"tensor cores; the FP8 GEMM needs compute capability >= 8.9 (Ada, Hopper). Use the bf16 routed_linear "
            f"on this GPU, or KernelOptions(backend='reference') for the plain-torch FP8 reference")


@triton.jit
def _fp8_tile_dot(x_desc, w_desc, m0, n0, wrow, K, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, SWIGLU: tl.constexpr, PRECISE: tl.constexpr, INTERPRETER: tl.constexpr):
    """The K loop of one tile for one expert: (gate) accumulator, and the up accumulator when SWIGLU (else a dummy
    copy of the first; the compiler drops it)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kk in range(0, tl.cdiv(K, BLOCK_K)):
        a = x_desc.load([m0, kk * BLOCK_K])
        b = w_desc.load([wrow, n0, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
        if INTERPRETER:
            # Position-independent broadcast-sum, as in the bf16 kernel (the interpreter's numpy dot is not). The
            # products of two e4m3 values are exact in fp32, so only the summation order differs from the GPU.
            acc += tl.sum(a.to(tl.float32)[:, :, None] * tl.trans(b.to(tl.float32))[None, :, :], 1)
            if SWIGLU:
                b2 = w_desc.load([wrow + 1, n0, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
                acc2 += tl.sum(a.to(tl.float32)[:, :, None] * tl.trans(b2.to(tl.float32))[None, :, :], 1)
        else:
            if PRECISE:  # promote to an fp32 add every BLOCK_K products (see the module docstring)
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BLOCK_K)
            else:
                acc = tl.dot(a, b.T, acc)
            if SWIGLU:
                b2 = w_desc.load([wrow + 1, n0, kk * BLOCK_K]).reshape(BLOCK_N, BLOCK_K)
                if PRECISE:
                    acc2 = tl.dot(a, b2.T, acc2, max_num_imprecise_acc=BLOCK_K)
                else:
                    acc2 = tl.dot(a, b2.T, acc2)
    return acc, acc2


@triton.jit
def _routed_gemm_fp8(
    x_desc, w_desc, out_desc, res_desc, XS, WS, BIAS, IDS, COUNTER,
    M, N, K,
    HAS_IDS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISE: tl.constexpr, INTERPRETER: tl.constexpr, BF16_BITS: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    out_ty = out_desc.dtype
    P: tl.constexpr = 2 if SWIGLU else 1
    num_tiles = num_m * num_n
    # Dynamic tile queue (as the bf16 kernel): which program computes a tile never changes its arithmetic.
    tile = tl.atomic_add(COUNTER, 1)
    while tile < num_tiles:
        m0, n0 = grouped_tile_origin(tile, num_m, num_n, GROUP_M, BLOCK_M, BLOCK_N)
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        ids, lo, hi = _row_experts(IDS, rows, M, HAS_IDS, BLOCK_M)
        xs = tl.load(XS + rows, mask=rows < M, other=0.0)
        result = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for e in range(lo, hi + 1):  # one pass, or two for a tile across the und/gen boundary
            acc, acc2 = _fp8_tile_dot(x_desc, w_desc, m0, n0, e * P, K, BLOCK_K, BLOCK_M, BLOCK_N, SWIGLU, PRECISE,
                                      INTERPRETER)
            acc = _add_bias(_scale(acc, xs, WS, e * P, N, cols), BIAS, e * P, N, cols, HAS_BIAS)
            if SWIGLU:
                up = _add_bias(_scale(acc2, xs, WS, e * P + 1, N, cols), BIAS, e * P + 1, N, cols, HAS_BIAS)
                acc = _swiglu(acc, up, out_ty, BF16_BITS)
            result = tl.where((ids == e)[:, None], acc, result)
        if HAS_RES:  # residual + rounded projection, as eager's ``x + linear(h)``
            res = res_desc.load([m0, n0]).to(tl.float32)
            result = res + _round(result, out_ty, BF16_BITS)
        out_desc.store([m0, n0], _round(result, out_ty, BF16_BITS).to(out_ty))
        tile = tl.atomic_add(COUNTER, 1)


def routed_gemm_fp8_triton(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    expert_ids: torch.Tensor | None,
    swiglu: bool = False,
    residual: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
    config: Fp8GemmConfig | None = None,
) -> torch.Tensor:
    """xq (M, K) e4m3; x_scale (M,) fp32; wq (E, P, N, K) e4m3 contiguous; w_scale (E, P, N) fp32; bias (E, P, N)
    or None; expert_ids (M,) int32 on the device or None (one expert). ``config`` overrides the per-shape config
    (benchmarks compare tiles with it; any fixed config keeps rows batch-invariant, but its bits are its own)."""
    require_fp8_tensor_cores(xq.device)
    m, k = xq.shape
    e, p, n, _ = wq.shape
    cfg = config or fp8_gemm_config(n, k, swiglu)
    if k % 16:  # TMA: the row pitch of a 1-byte tensor must be a multiple of 16 bytes
        raise ValueError(f"routed_gemm_fp8: K = {k} must be a multiple of 16 (TMA row alignment)")
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    xq = xq.contiguous()
    wq = wq.contiguous()
    x_desc = TensorDescriptor.from_tensor(xq, [cfg.BLOCK_M, cfg.BLOCK_K])
    w_desc = TensorDescriptor.from_tensor(wq.view(e * p, n, k), [1, cfg.BLOCK_N, cfg.BLOCK_K])
    out_desc = TensorDescriptor.from_tensor(out, [cfg.BLOCK_M, cfg.BLOCK_N])
    res_desc = (TensorDescriptor.from_tensor(residual.contiguous(), [cfg.BLOCK_M, cfg.BLOCK_N])
                if residual is not None else out_desc)
    tiles = triton.cdiv(m, cfg.BLOCK_M) * triton.cdiv(n, cfg.BLOCK_N)
    _routed_gemm_fp8[(_num_programs(xq.device, tiles),)](
        x_desc, w_desc, out_desc, res_desc, x_scale.contiguous(), w_scale.contiguous(),
        bias.contiguous() if bias is not None else x_scale, expert_ids if expert_ids is not None else x_scale,
        torch.zeros(1, dtype=torch.int32, device=xq.device), m, n, k,
        HAS_IDS=expert_ids is not None, HAS_BIAS=bias is not None, HAS_RES=residual is not None, SWIGLU=swiglu,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        PRECISE=cfg.precise_acc, INTERPRETER=triton_interpreting(),
        BF16_BITS=triton_interpreting() and out_dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out
