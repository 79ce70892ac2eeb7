"""FP8 routed GEMM entry point: the one place that chooses the FP8 backend (as ``routed_linear`` does for bf16).

``routed_gemm_fp8(xq, x_scale, routing, wq, w_scale, bias, activation=..., residual=...)`` computes
``act((xq[r] @ wq[e(r)].T) * x_scale[r] * w_scale[e(r)] + bias[e(r)]) (+ residual[r])`` — e4m3 codes with fp32
per-row / per-output-channel scales from ``fp8_quant.quantize_rows`` / ``quantize_channels``, stacked weights
(E, P, N, K) (P = 2 for SwiGLU), output in ``out_dtype`` (the activation dtype, bf16 by default).

Backends (``KernelOptions.backend``): CPU tensors -> the plain-torch reference (``routed_linear_fp8_reference``), or
the Triton kernel under the interpreter with ``backend="triton"``; CUDA tensors -> the Triton FP8 kernel
(``routed_gemm_fp8_triton``; "gluon" and "auto" too: there is no Gluon FP8 kernel yet), or the reference with
``backend="reference"``. ``mode="fast"`` changes nothing here: the Triton kernel is the only FP8 GPU path, and it
is batch-invariant. A GPU without FP8 tensor cores (compute capability < 8.9) raises, naming the GPU.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .linear import ExpertSegments, device_expert_ids
from .options import KernelOptions, resolve_options
from .routed_linear_fp8_reference import Activation, check_fp8_routed, routed_gemm_fp8_reference
from .routed_gemm_fp8_triton import routed_gemm_fp8_triton


def routed_gemm_fp8(xq: torch.Tensor, x_scale: torch.Tensor, routing: ExpertSegments | None, wq: torch.Tensor,
                    w_scale: torch.Tensor, bias: torch.Tensor | None = None, *, activation: Activation = None,
                    residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                    expert_ids: torch.Tensor | None = None, options: KernelOptions | None = None) -> torch.Tensor:
    """Expert-routed FP8 projection; ``expert_ids`` (int32 per row, on the device) as in ``routed_linear``."""
    check_fp8_routed(xq, x_scale, routing, wq, w_scale, bias, activation, residual, out_dtype)
    opts = resolve_options(options)
    if resolve_backend(xq.device, opts) == "reference":
        return routed_gemm_fp8_reference(xq, x_scale, routing, wq, w_scale, bias, activation, residual, out_dtype)
    ids = device_expert_ids(routing, expert_ids, wq.shape[0], xq.device)
    return routed_gemm_fp8_triton(xq, x_scale, wq, w_scale, bias, ids, activation == "swiglu", residual, out_dtype)
