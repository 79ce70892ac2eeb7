"""RMSNorm with per-expert weights: the Triton kernel's entry point and its plain-torch reference.

One row, one fixed reduction order: the statistics are computed in fp32 per row over the whole hidden size in one
block whose width depends only on the hidden size, so a row's result never depends on the other rows.
"""
from __future__ import annotations

import torch

from ._dispatch import resolve_backend
from .linear import ExpertSegments, device_expert_ids, routed_apply
from .fp8_quant import QuantizedRows, norm_bound_scale, quantize_rows, quantize_rows_static
from .norms_triton import rms_norm_fp8_triton, rms_norm_triton
from .options import KernelOptions


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None):
    """Qwen2 RMSNorm: ``weight * (x / sqrt(mean(x^2) + eps))`` computed in fp32, cast back as Qwen2 does."""
    if x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rms_norm: last dim {x.shape[-1]} != weight size {weight.shape[0]}")
    in_dtype = x.dtype
    xf = x.float()
    var = xf.pow(2).mean(-1, keepdim=True)
    xf = xf * torch.rsqrt(var + eps)
    # Qwen2 casts the normalized activations back to the input dtype before scaling by the weight.
    y = weight * xf.to(in_dtype)
    return y.to(out_dtype or in_dtype)


def routed_rms_norm_reference(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor,
                              eps: float) -> torch.Tensor:
    if routing is None:
        return rms_norm_reference(x, weight[0], eps)
    return routed_apply(x, routing, lambda t: rms_norm_reference(t, weight[0], eps),
                        lambda t: rms_norm_reference(t, weight[1], eps))


def _check(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor,
           expert_ids: torch.Tensor | None) -> None:
    if weight.dim() != 2 or x.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"rms_norm: need x (rows, H) and weight (experts, H); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if routing is not None and routing.num_tokens != x.shape[0]:
        raise ValueError(f"rms_norm: routing covers {routing.num_tokens} rows but the input has {x.shape[0]}")
    if routing is None and weight.shape[0] != 1 and expert_ids is None:
        raise ValueError(f"rms_norm: a weight with {weight.shape[0]} experts needs a routing")


def routed_rms_norm(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor, eps: float, *,
                    expert_ids: torch.Tensor | None = None, options: KernelOptions | None = None) -> torch.Tensor:
    """RMSNorm of rows ``x`` (M, H) with the weight of each row's expert: ``weight`` is (E, H)."""
    _check(x, routing, weight, expert_ids)
    if resolve_backend(x.device, options) == "reference":
        return routed_rms_norm_reference(x, routing, weight, eps)
    return rms_norm_triton(x, weight, eps, device_expert_ids(routing, expert_ids, weight.shape[0], x.device))


def routed_rms_norm_fp8(x: torch.Tensor, routing: ExpertSegments | None, weight: torch.Tensor, eps: float, *,
                        static_bound: bool = False, expert_ids: torch.Tensor | None = None,
                        options: KernelOptions | None = None) -> QuantizedRows:
    """``routed_rms_norm`` whose output is the next FP8 projection's input: quantized per row
    (``fp8_quant.quantize_rows`` of the normalized rows, the same bits), in one pass on the GPU — the producer
    fusion that keeps a standalone quantization off the FP8 layer's hot path. ``static_bound``: each row with its
    expert's static ``fp8_quant.norm_bound_scale`` instead of its own amax (``quantize_rows_static``)."""
    if resolve_backend(x.device, options) == "reference":
        h = routed_rms_norm(x, routing, weight, eps, expert_ids=expert_ids, options=options)
        if not static_bound:
            return QuantizedRows(*quantize_rows(h), x.dtype)
        bound = norm_bound_scale(weight)
        scale = bound[0].expand(h.shape[0]) if routing is None else bound[routing.expert_ids(h.device).long()]
        return QuantizedRows(*quantize_rows_static(h, scale), x.dtype)
    _check(x, routing, weight, expert_ids)
    q, s = rms_norm_fp8_triton(x, weight, eps, device_expert_ids(routing, expert_ids, weight.shape[0], x.device),
                               static=static_bound)
    return QuantizedRows(q, s, x.dtype)
