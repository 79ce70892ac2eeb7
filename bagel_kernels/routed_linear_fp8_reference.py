"""Plain-torch reference of the FP8 routed GEMM (the CPU path of ``routed_gemm_fp8`` and the tests' yardstick).

``out[r] = act((sum_k xq[r, k] * wq[e(r), p, n, k]) * x_scale[r] * w_scale[e(r), p, n] + b[e(r), p, n])
(+ residual[r])`` with e4m3 codes ``xq`` (M, K) / ``wq`` (E, P, N, K), fp32 per-row scales ``x_scale`` (M,) and
per-output-channel scales ``w_scale`` (E, P, N) (``fp8_quant.quantize_rows`` / ``quantize_channels``).

Order of operations = the Triton kernel's: the fp8 x fp8 products are exact in fp32 (4-bit significands), summed in
fp32; then the row scale, then the channel scale, then the bias (fp32), then the epilogue with the bf16 routed GEMM's
roundings (SwiGLU: gate and up rounded to the output dtype, silu rounded, product; residual: the projection rounded
to the output dtype, added in fp32, rounded). ``out_dtype`` may also be fp32 here, and only here (a float32 model on
the CPU): every rounding to the output dtype is then a no-op, so the math is the dequantized product in fp32 with
an fp32 bias, SwiGLU and residual add. Only the order of the fp32 sum differs from the GPU (and Hopper's FP8
tensor cores keep fewer accumulator bits, see ``routed_gemm_fp8_triton``), so the two agree to rounding, not bits.

Row independence: each (segment, part) is one row-padded fp32 GEMM (``invariant_linear_reference``: CPU BLAS picks
other kernels for tiny M), and every scale is per row or per column — a row's bits never depend on the other rows.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from .fp8_quant import FP8_DTYPE
from .linear import ExpertSegments, invariant_linear_reference

Activation = Literal["swiglu"] | None


def check_fp8_routed(xq: torch.Tensor, x_scale: torch.Tensor, routing: ExpertSegments | None, wq: torch.Tensor,
                     w_scale: torch.Tensor, bias: torch.Tensor | None, activation: Activation,
                     residual: torch.Tensor | None, out_dtype: torch.dtype, allow_fp32: bool = False) -> None:
    """Shapes and dtypes of an FP8 routed GEMM call, with errors that name the argument. ``allow_fp32``: the
    reference also takes fp32 activations (a float32 model on the CPU); the Triton kernel does not."""
    if xq.dtype != FP8_DTYPE or wq.dtype != FP8_DTYPE:
        raise TypeError(f"routed_gemm_fp8: activations and weights must be {FP8_DTYPE} codes, got {xq.dtype} and "
                        f"{wq.dtype} (quantize with bagel_kernels.fp8_quant)")
    if wq.dim() != 4:
        raise ValueError(f"routed_gemm_fp8: weight must be (experts, parts, N, K), got shape {tuple(wq.shape)}")
    e, p, n, k = wq.shape
    if p != (2 if activation == "swiglu" else 1):
        raise ValueError(f"routed_gemm_fp8: activation {activation!r} needs {2 if activation else 1} weight parts, "
                         f"got {p}")
    if xq.dim() != 2 or xq.shape[1] != k:
        raise ValueError(f"routed_gemm_fp8: input must be (rows, {k}), got shape {tuple(xq.shape)}")
    m = xq.shape[0]
    if x_scale.dtype != torch.float32 or tuple(x_scale.shape) != (m,):
        raise ValueError(f"routed_gemm_fp8: x_scale must be fp32 ({m},), got {x_scale.dtype} {tuple(x_scale.shape)}")
    if w_scale.dtype != torch.float32 or tuple(w_scale.shape) != (e, p, n):
        raise ValueError(f"routed_gemm_fp8: w_scale must be fp32 {(e, p, n)}, got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    allowed = (torch.bfloat16, torch.float16) + ((torch.float32,) if allow_fp32 else ())
    if out_dtype not in allowed:  # the activation dtypes (an fp32 tile would not fit the kernel's smem)
        raise TypeError(f"routed_gemm_fp8: out_dtype must be bf16 or fp16{' or fp32' if allow_fp32 else ''} "
                        f"(fp32 only with the plain-torch reference), got {out_dtype}")
    if bias is not None and tuple(bias.shape) != (e, p, n):
        raise ValueError(f"routed_gemm_fp8: bias must be {(e, p, n)}, got {tuple(bias.shape)}")
    if residual is not None and (tuple(residual.shape) != (m, n) or residual.dtype != out_dtype):
        raise ValueError(f"routed_gemm_fp8: residual must be {out_dtype} {(m, n)}, got {residual.dtype} "
                         f"{tuple(residual.shape)}")
    if routing is not None:
        if routing.num_tokens != m:
            raise ValueError(f"routed_gemm_fp8: routing covers {routing.num_tokens} rows but the input has {m}")
        if e < 2 and any(g for _, _, g in routing.segments):
            raise ValueError("routed_gemm_fp8: routing has generation rows but the weight has one expert")
    elif e != 1:
        raise ValueError(f"routed_gemm_fp8: a weight with {e} experts needs a routing")


def scaled_projection(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``(xq @ wq.T) * x_scale[:, None] * w_scale[None, :] + bias`` for one expert part, row-invariant."""
    acc = invariant_linear_reference(xq.float(), wq.float())
    y = acc * x_scale[:, None] * w_scale[None, :]
    return y if bias is None else y + bias.float()[None, :]


def routed_gemm_fp8_reference(xq: torch.Tensor, x_scale: torch.Tensor, routing: ExpertSegments | None,
                              wq: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                              activation: Activation = None, residual: torch.Tensor | None = None,
                              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The FP8 routed GEMM in plain torch, one row-padded fp32 GEMM per (contiguous segment, part); ``out_dtype``
    bf16, fp16 or (the reference only) fp32."""
    check_fp8_routed(xq, x_scale, routing, wq, w_scale, bias, activation, residual, out_dtype, allow_fp32=True)
    segments = routing.segments if routing is not None else ((0, xq.shape[0], False),)
    n = wq.shape[2]

    def project(s: int, t: int, e: int) -> torch.Tensor:
        part = [scaled_projection(xq[s:t], x_scale[s:t], wq[e, j], w_scale[e, j], None if bias is None else bias[e, j])
                for j in range(wq.shape[1])]
        return _epilogue(part, activation, None if residual is None else residual[s:t], out_dtype)

    return _concat([project(s, t, int(g)) for s, t, g in segments if t > s], n, out_dtype, xq.device)


def _epilogue(part: list[torch.Tensor], activation: Activation, residual: torch.Tensor | None,
              out_dtype: torch.dtype) -> torch.Tensor:
    """The bf16 kernel's epilogue roundings on a segment's fp32 projections (one per part)."""
    if activation == "swiglu":  # gate, up, silu(gate) each rounded to the output dtype
        gate, up = part[0].to(out_dtype).float(), part[1].to(out_dtype).float()
        y = F.silu(gate).to(out_dtype).float() * up
    else:
        y = part[0]
    if residual is not None:  # residual + rounded projection, as eager's ``x + linear(h)``
        y = residual.float() + y.to(out_dtype).float()
    return y.to(out_dtype)


def _concat(parts: list[torch.Tensor], n: int, out_dtype: torch.dtype, device) -> torch.Tensor:
    if not parts:
        return torch.empty(0, n, dtype=out_dtype, device=device)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def routed_gemm_fp8_dequantized_reference(x_deq: torch.Tensor, routing: ExpertSegments | None, wq: torch.Tensor,
                                          w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                                          activation: Activation = None, residual: torch.Tensor | None = None,
                                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The FP8 routed GEMM for activation scalings other than per row (``KernelOptions.fp8_activation_scaling``
    "group128" / "tensor"), in plain torch: ``x_deq`` (M, K) fp32 is the dequantized activation (e4m3 codes times
    their expanded scales, ``fp8_quant.dequantize_row_groups`` / ``dequantize_tensor``), multiplied in fp32 with the
    per-channel-dequantized weight ``wq.float() * w_scale`` (one row-padded GEMM per (segment, part), as
    ``routed_gemm_fp8_reference``); bias, SwiGLU and residual epilogues with that function's roundings. A scale that
    varies along K cannot be applied after the sum, hence the dequantized operands (the fp32 sum of exact products
    ``code * scale`` is what a grouped kernel's per-group rescaled accumulation computes, up to summation order)."""
    if x_deq.dtype != torch.float32 or x_deq.dim() != 2:
        raise TypeError(f"routed_gemm_fp8_dequantized_reference: x_deq must be fp32 (rows, K), got {x_deq.dtype} "
                        f"{tuple(x_deq.shape)}")
    # the shape/dtype checks of the codes path, on a placeholder with x_deq's shape and per-row scales
    check_fp8_routed(torch.empty(x_deq.shape, dtype=FP8_DTYPE, device=x_deq.device),
                     torch.empty(x_deq.shape[0], dtype=torch.float32, device=x_deq.device), routing, wq, w_scale,
                     bias, activation, residual, out_dtype, allow_fp32=True)
    segments = routing.segments if routing is not None else ((0, x_deq.shape[0], False),)
    n = wq.shape[2]

    def project(s: int, t: int, e: int) -> torch.Tensor:
        part = []
        for j in range(wq.shape[1]):
            w = wq[e, j].float() * w_scale[e, j].float()[:, None]  # fp8_quant.dequantize_channels
            y = invariant_linear_reference(x_deq[s:t], w)
            part.append(y if bias is None else y + bias[e, j].float()[None, :])
        return _epilogue(part, activation, None if residual is None else residual[s:t], out_dtype)

    return _concat([project(s, t, int(g)) for s, t, g in segments if t > s], n, out_dtype, x_deq.device)
