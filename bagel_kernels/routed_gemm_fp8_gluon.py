"""Hopper warp-specialized FP8 routed GEMM: ``routed_gemm_fp8_triton``'s arithmetic on ``routed_gemm_gluon``'s schedule.

Why a second FP8 kernel: Triton 3.6 cannot warp-specialize the FP8 kernel either, and with a single warp group
alternating TMA waits, wgmma and the epilogue it ran 0.49-0.79x ``torch._scaled_mm`` (benchmarks/RESULTS.md). This
launches the bf16 Gluon kernel's skeleton — a producer warp streaming x and W tiles through an mbarrier ring, two
consumer warpgroups, persistent tiles that start at each expert segment, the stream-K split of a ragged last
round — on e4m3 operands, with K steps of 128 and the scales applied in the epilogue
(``acc * x_scale[row] * w_scale[expert, column]``, then bias, SwiGLU and residual with the bf16 kernel's roundings).

Accumulation (``Fp8GluonConfig.promote``): Hopper's FP8 MMA keeps fewer than fp32's bits while it accumulates. With
promotion (the default) each 128-wide K step accumulates from zero and is then added to the running fp32 sum
(DeepSeek-V3's scheme; the Triton kernel's ``max_num_imprecise_acc = BLOCK_K``); this needs a second accumulator,
so tiles are 128 x 128 (SwiGLU: 128 x 64 x 2) to stay in registers. Without it the K loop stays in the MMA's
accumulator like ``torch._scaled_mm(use_fast_accum=True)``, and the bf16 kernel's 128 x 256 tiles fit.

Exactness: the tile shape, K step and accumulation are fixed per (N, K, activation) by ``fp8_gluon_config`` — never
from M — and a row's result does not depend on its tile or the program that computes it (see ``routed_gemm_gluon``),
so rows are batch- and sequence-parallel-invariant. The bits are this kernel's own: the FP8 exactness class on
Hopper is defined by it, and every parallel configuration runs it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .routed_gemm_fp8_triton import require_fp8_tensor_cores
from .routed_gemm_gluon import BLOCK_M, GROUP_M, launch_routed_gemm_ws

BLOCK_K = 128  # one K step = 4 wgmma k32 instructions; the promotion interval
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block


@dataclass(frozen=True)
class Fp8GluonConfig:
    """``block_k``: the K step (the ring's stage width). With promotion it is also the promotion interval, so it is
    part of the bits; without it only the order of the k32 wgmma instructions is (always K order), so the K step is
    free to change without moving a bit (``bench_fp8_gemm --sweep`` checks that). ``group_m``: row tiles per L2
    group of the tile order (which program computes a tile never changes a row's bits)."""
    block_n: int
    stages: int
    promote: bool
    block_k: int = BLOCK_K
    group_m: int = GROUP_M


def _stages_that_fit(block_n: int, parts: int, block_k: int = BLOCK_K) -> int:
    """As many ring stages as fit beside the bf16 output tile (at most 6: more buys nothing at these shapes)."""
    stage = BLOCK_M * block_k + parts * block_n * block_k
    out_tile = BLOCK_M * block_n * 2
    return min(6, (SMEM_BYTES - out_tile - 1024) // stage)


def fp8_gluon_config(n: int, k: int, swiglu: bool, promote: bool = True) -> Fp8GluonConfig:
    """The one configuration for an FP8 weight (N, K): a function of (N, K, activation, accumulation) only, never of
    M (an autotuner's choice per problem size would make a row's bits follow M)."""
    if promote:
        bn = 64 if swiglu else 128  # accumulator + step accumulator (x2 for SwiGLU) in 168 registers per thread
    else:
        bn = 128 if swiglu else 256  # one accumulator (two for SwiGLU): the bf16 kernel's tiles
    return Fp8GluonConfig(bn, _stages_that_fit(bn, 2 if swiglu else 1), promote)


def routed_gemm_fp8_gluon(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                          bias: torch.Tensor | None, expert_ids: torch.Tensor | None, swiglu: bool = False,
                          residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                          segments: tuple[tuple[int, int, int], ...] | None = None,
                          split_tail: bool | None = None, config: Fp8GluonConfig | None = None) -> torch.Tensor:
    """``routed_gemm_fp8_triton``'s contract on the warp-specialized kernel: xq (M, K) e4m3 contiguous; x_scale (M,)
    fp32; wq (E, P, N, K) e4m3 contiguous; w_scale (E, P, N) fp32; bias (E, P, N) in ``out_dtype`` or None;
    expert_ids (M,) int32 on the device or None; ``segments`` and ``split_tail`` as ``routed_gemm_gluon``'s.
    ``config`` overrides the per-shape configuration (benchmarks compare them; any fixed one is batch-invariant)."""
    require_fp8_tensor_cores(xq.device)
    m, k = xq.shape
    _, p, n, _ = wq.shape
    if k % 16:  # TMA: the row pitch of a 1-byte tensor must be a multiple of 16 bytes
        raise ValueError(f"routed_gemm_fp8: K = {k} must be a multiple of 16 (TMA row alignment)")
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"routed_gemm_fp8_gluon: out_dtype must be bf16 or fp16, got {out_dtype}")
    cfg = config or fp8_gluon_config(n, k, swiglu)
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    return launch_routed_gemm_ws(xq.contiguous(), wq.contiguous(), out, bias, expert_ids, swiglu,
                                 None if residual is None else residual.contiguous(), segments, split_tail,
                                 cfg.block_n, cfg.block_k, cfg.stages, x_scale.contiguous().float(),
                                 w_scale.contiguous().float(), cfg.promote, group_m=cfg.group_m)
