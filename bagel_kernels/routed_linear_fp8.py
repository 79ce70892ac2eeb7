"""FP8 routed GEMM entry point: the one place that chooses the FP8 backend (as ``routed_linear`` does for bf16).

``routed_gemm_fp8(xq, x_scale, routing, wq, w_scale, bias, activation=..., residual=...)`` computes
``act((xq[r] @ wq[e(r)].T) * x_scale[r] * w_scale[e(r)] + bias[e(r)]) (+ residual[r])`` — e4m3 codes with fp32
per-row / per-output-channel scales from ``fp8_quant.quantize_rows`` / ``quantize_channels``, stacked weights
(E, P, N, K) (P = 2 for SwiGLU), output in ``out_dtype`` (the activation dtype, bf16 by default).

Backends (``KernelOptions.backend``): CPU tensors -> the plain-torch reference (``routed_linear_fp8_reference``), or
the Triton kernel under the interpreter with ``backend="triton"``; CUDA tensors on Hopper -> the warp-specialized
Gluon FP8 kernel (``routed_gemm_fp8_gluon``, backends "auto" and "gluon"), elsewhere (Ada, or ``backend="triton"``)
the Triton FP8 kernel (``routed_gemm_fp8_triton``), or the reference with ``backend="reference"``. With
``KernelOptions.fp8_accumulation="promoted"`` the two GPU kernels give the same bits (each 128-wide K step summed in
the MMA, the steps added in fp32 in K order; their tiles differ, which changes no row); the default "fast" (the
whole K loop in the MMA's accumulator) is faster and its own class of bits, per kernel. Either way a row's bits do
not depend on the batch, and one device and every parallel configuration run the same kernel.
``mode="fast"`` changes nothing here. A GPU without FP8 tensor cores (compute capability < 8.9) raises, naming the
GPU.

The model's FP8 projections (``KernelOptions(quantization="fp8")``) call ``routed_linear_fp8``: activations in the
model's dtype are quantized per row by ``quantize_activation_rows`` — the one place the model's activations become
e4m3, so that a fused producer (a quantizing RMSNorm or SwiGLU epilogue) can replace it — then ``routed_gemm_fp8``
runs with the output in the activation dtype. ``require_fp8_support`` is the early check (model construction and
placement) that the device and dtype can run it.

``KernelOptions.fp8_activation_scaling``: "qkv_bound" changes only what the RMSNorm before QKV writes (its static
scale arrives per row in ``QuantizedRows``); other inputs are per row as with "row". "tensor" (one scale over the
launch's rows, not batch-invariant — a comparison mode) fills the kernels' per-row scale vector with the launch's
one scale (``fp8_quant.quantize_tensor``), so it runs on every backend. "group128" (1 x 128 groups along K) runs
only the plain-torch reference: the activation is quantized (``fp8_quant.quantize_row_groups``), dequantized to fp32
and multiplied with the per-channel-dequantized weight (``routed_gemm_fp8_dequantized_reference``); the kernels have
one activation scale per row, so on a backend other than the reference (CUDA, or the CPU interpreter) it raises
NotImplementedError, at model construction (``require_fp8_support``) and at the call; there is no silent fallback.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from ._dispatch import resolve_backend, use_gluon
from .linear import ExpertSegments, device_expert_ids
from .options import KernelOptions, resolve_options
from .fp8_quant import (QuantizedRows, dequantize_row_groups, dequantize_tensor, quantize_row_groups,
                        quantize_rows, quantize_tensor)
from .fp8_quant_triton import quantize_rows_triton
from .routed_linear_fp8_reference import (Activation, check_fp8_routed, routed_gemm_fp8_dequantized_reference,
                                          routed_gemm_fp8_reference)
from .routed_gemm_fp8_gluon import fp8_gluon_config, routed_gemm_fp8_gluon
from .routed_gemm_fp8_small_batch import routed_gemm_fp8_small_batch
from .routed_gemm_fp8_triton import fp8_gemm_config, require_fp8_tensor_cores, routed_gemm_fp8_triton
from .routed_gemm_triton import SMALL_BATCH_ROWS


def routed_gemm_fp8(xq: torch.Tensor, x_scale: torch.Tensor, routing: ExpertSegments | None, wq: torch.Tensor,
                    w_scale: torch.Tensor, bias: torch.Tensor | None = None, *, activation: Activation = None,
                    residual: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
                    expert_ids: torch.Tensor | None = None, options: KernelOptions | None = None,
                    small_batch: bool = False) -> torch.Tensor:
    """Expert-routed FP8 projection; ``expert_ids`` (int32 per row, on the device) as in ``routed_linear``.
    ``out_dtype`` fp32 is taken by the reference backend only (a float32 model on the CPU). ``small_batch=True``
    (AR decode: at most ``SMALL_BATCH_ROWS`` rows) runs ``routed_gemm_fp8_small_batch`` on a GPU backend, split over
    N so that every SM streams the weights (its bits are its own, fixed per weight shape like the large kernels')."""
    opts = resolve_options(options)
    reference = resolve_backend(xq.device, opts) == "reference"
    check_fp8_routed(xq, x_scale, routing, wq, w_scale, bias, activation, residual, out_dtype, allow_fp32=reference)
    if reference:
        return routed_gemm_fp8_reference(xq, x_scale, routing, wq, w_scale, bias, activation, residual, out_dtype)
    ids = device_expert_ids(routing, expert_ids, wq.shape[0], xq.device)
    if small_batch and xq.shape[0] <= SMALL_BATCH_ROWS:
        return routed_gemm_fp8_small_batch(xq, x_scale, wq, w_scale, bias, ids, activation == "swiglu", residual,
                                           out_dtype)
    swiglu, promoted = activation == "swiglu", opts.fp8_accumulation == "promoted"
    n, k = wq.shape[2], wq.shape[3]
    if use_gluon(xq.device, out_dtype, opts):  # Hopper: the warp-specialized kernel
        return routed_gemm_fp8_gluon(xq, x_scale, wq, w_scale, bias, ids, swiglu, residual, out_dtype,
                                     segments=None if routing is None else routing.segments,
                                     config=fp8_gluon_config(n, k, swiglu, promote=promoted))
    return routed_gemm_fp8_triton(xq, x_scale, wq, w_scale, bias, ids, swiglu, residual, out_dtype,
                                  config=replace(fp8_gemm_config(n, k, swiglu), precise_acc=promoted))


def quantize_activation_rows(x: torch.Tensor, options: KernelOptions | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 quantization of a projection's input (rows, K) -> (codes, fp32 scale (rows,)): the one place the FP8
    model quantizes activations.

    Per row: the reference runs ``fp8_quant.quantize_rows``; the Triton backend its Triton twin
    (``fp8_quant_triton.quantize_rows_triton``, the same bits: the arithmetic is exact or correctly rounded). Inputs
    whose producer can quantize them (the RMSNorm before QKV and gate/up: ``routed_rms_norm_fp8``) arrive as
    ``QuantizedRows`` and skip this. ``fp8_activation_scaling="tensor"`` (a comparison mode, not batch-invariant):
    ``fp8_quant.quantize_tensor``, its one scale repeated per row."""
    opts = resolve_options(options)
    if opts.fp8_activation_scaling == "tensor":
        if x.dim() != 2:
            raise ValueError(f"quantize_activation_rows: expects (rows, K), got shape {tuple(x.shape)}")
        q, s = quantize_tensor(x)
        return q, s.expand(x.shape[0]).contiguous()
    if resolve_backend(x.device, opts) == "reference":
        return quantize_rows(x)
    return quantize_rows_triton(x)


def _reference_only(scaling: str, device: torch.device) -> NotImplementedError:
    return NotImplementedError(
        f"KernelOptions(fp8_activation_scaling={scaling!r}) runs only the plain-torch reference (CPU tensors, or "
        f"backend='reference'); the FP8 kernels on {device} take one activation scale per row "
        f"(fp8_activation_scaling 'row', 'qkv_bound' or 'tensor')")


def dequantized_activation(x: torch.Tensor, scaling: str) -> torch.Tensor:
    """``x`` (rows, K) quantized to e4m3 with ``scaling`` ("row" | "group128" | "tensor") and dequantized to fp32:
    what the FP8 GEMM's activation operand means (the accuracy studies compare these scalings)."""
    if scaling == "row":
        q, s = quantize_rows(x)
        return q.float() * s[:, None]
    if scaling == "group128":
        q, s = quantize_row_groups(x, 128)
        return dequantize_row_groups(q, s, 128)
    if scaling == "tensor":
        if x.dim() != 2:
            raise ValueError(f"dequantized_activation: expects (rows, K), got shape {tuple(x.shape)}")
        q, s = quantize_tensor(x)
        return dequantize_tensor(q, s)
    raise ValueError(f"unknown fp8 activation scaling {scaling!r}; expected one of ('row', 'group128', 'tensor')")


def routed_linear_fp8(x: torch.Tensor | QuantizedRows, routing: ExpertSegments | None, wq: torch.Tensor,
                      w_scale: torch.Tensor, bias: torch.Tensor | None = None, *, activation: Activation = None,
                      residual: torch.Tensor | None = None, expert_ids: torch.Tensor | None = None,
                      options: KernelOptions | None = None, small_batch: bool = False) -> torch.Tensor:
    """``routed_linear`` with FP8 weights: ``x`` (rows, K) in the activation dtype is quantized per row
    (``quantize_activation_rows``) and multiplied with the e4m3 weight ``wq`` (E, P, N, K) and its per-channel
    scales ``w_scale`` (E, P, N); bias, SwiGLU and residual epilogues as ``routed_linear``'s; output in x's dtype.
    ``x`` may come quantized already (``QuantizedRows``, from a quantizing producer).
    ``small_batch=True`` (AR decode, at most ``SMALL_BATCH_ROWS`` rows): the small-batch kernel (``routed_gemm_fp8``).
    ``options.fp8_activation_scaling`` "tensor": the launch's one scale per row; "group128": the reference on
    dequantized activations (module docstring), NotImplementedError on any other backend."""
    opts = resolve_options(options)
    if bias is not None and bias.dim() == 3 and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if isinstance(x, QuantizedRows):  # quantized by its producer (per row, or with its static bound)
        if opts.fp8_activation_scaling not in ("row", "qkv_bound"):
            raise ValueError(f"routed_linear_fp8: per-row quantized input with fp8_activation_scaling="
                             f"{opts.fp8_activation_scaling!r}")
        xq, xs = x.codes, x.scale
    elif opts.fp8_activation_scaling == "group128":
        if resolve_backend(x.device, opts) != "reference":
            raise _reference_only(opts.fp8_activation_scaling, x.device)
        xd = dequantized_activation(x, opts.fp8_activation_scaling)
        return routed_gemm_fp8_dequantized_reference(xd, routing, wq, w_scale, bias, activation, residual, x.dtype)
    else:
        xq, xs = quantize_activation_rows(x, options)
    return routed_gemm_fp8(xq, xs, routing, wq, w_scale, bias, activation=activation, residual=residual,
                           out_dtype=x.dtype, expert_ids=expert_ids, options=options, small_batch=small_batch)


def require_fp8_support(options: KernelOptions | None, device: torch.device | str,
                        dtype: torch.dtype | None = None) -> None:
    """Early check of ``quantization="fp8"`` on ``device``: nothing to check on the CPU (the reference runs) or
    for ``quantization="none"``; on CUDA (unless ``backend="reference"``) the GPU needs FP8 tensor cores (compute
    capability >= 8.9; the error names the GPU) and the activations must be bf16 or fp16 (the Triton kernel's
    output dtypes). Called where a model is built or placed, before any weight is allocated or moved."""
    opts = resolve_options(options)
    device = torch.device(device)
    if opts.quantization != "fp8" or device.type != "cuda" or opts.backend == "reference":
        return
    if opts.fp8_activation_scaling == "group128":
        raise _reference_only(opts.fp8_activation_scaling, device)
    require_fp8_tensor_cores(device)
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantization='fp8' on {device} runs the Triton FP8 GEMM, whose activations are bf16 or "
                         f"fp16; got dtype {dtype} (use bf16, or KernelOptions(backend='reference'))")
