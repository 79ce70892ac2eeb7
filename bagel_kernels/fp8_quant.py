"""FP8 (float8_e4m3fn) quantizers in plain torch: the reference every FP8 kernel's quantization must reproduce.

Scales are fp32 and multiply back: ``x ~= q.float() * scale``. Five granularities:

- ``quantize_rows``: one scale per row of an activation (M, K) -> scale (M,). Per-row, so a row's codes and scale
  never depend on the other rows of the launch (the exactness contract; a per-tensor scale would break it).
- ``quantize_row_groups``: one scale per 1 x ``group`` slice of a row (DeepSeek-V3 style) -> scale (M, ceil(K/g)).
- ``quantize_channels``: one scale per output channel of a weight (..., N, K) -> scale (..., N).
- ``quantize_blocks``: one scale per ``block`` x ``block`` tile of a weight (..., N, K) -> (..., ceil(N/b), ceil(K/b)).
- ``quantize_tensor``: one scale for the whole tensor -> scale () (0-dim). For activations it is NOT row-local: a
  row's codes depend on every other row's values (a comparison mode for accuracy studies; see
  ``KernelOptions.fp8_activation_scaling``).
- ``quantize_rows_static``: activations (M, K) with a scale fixed in advance per row (not from the row's values):
  the RMSNorm-bound scale ``norm_bound_scale`` of the QKV input (``KernelOptions.fp8_activation_scaling=
  "qkv_bound"``). Row-local like per-row scaling, and every token shares one grid like per-tensor scaling.

Arithmetic (the same for all five; a fused quantization kernel must reproduce it to give the same codes):
``amax`` = max |x| over the group in fp32; ``scale = amax / 448`` (fp32 division, correctly rounded), except that an
all-zero group gets ``scale = 1.0`` — not a tiny floor: zero codes times 1 dequantize to exact zeros, and a floor
such as 1e-12 would only put a meaningless number into the scale tensor. ``q = (x / scale)`` in fp32, clamped to
[-448, 448], then cast with ``.to(torch.float8_e4m3fn)``.

Rounding of the cast (checked on CPU, torch 2.13): round to nearest, ties to even, in normals and subnormals
(1.0625 -> 1.0, 1.1875 -> 1.25, 2^-10 -> 0); out-of-range values saturate to +-448 (even +-inf), NaN stays NaN.
Older torch releases turned |x| >= 480 into NaN instead of saturating, which is why the clamp is there: with it the
codes are the same whichever behaviour the installed torch has (x / scale can exceed 448 by a rounding ulp).

Non-finite input is never turned into a number: a NaN anywhere in a group makes ``amax`` (torch's max propagates
NaN) and so the scale NaN, and every code of the group NaN; an +-inf makes the scale inf, and although the finite
entries' codes become 0, 0 * inf dequantizes (and multiplies in a GEMM epilogue) to NaN. So a group with any
non-finite value dequantizes to all NaN, and a GEMM row that reads such a row or column scale outputs NaN.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
GROUP = 128  # the 1x128 activation groups and 128x128 weight blocks of the grouped variants


class QuantizedRows(NamedTuple):
    """A projection's input already quantized per row by its producer (a quantizing RMSNorm): e4m3 ``codes``
    (M, K), fp32 ``scale`` (M,), and ``dtype``, the activation dtype the projection's output is in."""
    codes: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def device(self) -> torch.device:
        return self.codes.device


def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """fp32 scale = amax / 448, and 1.0 where the group is all zeros (amax == 0; NaN amax stays NaN).

    The divisor is a tensor on amax's device, not the Python float: on CUDA, torch divides by a CPU scalar as a
    multiplication by its reciprocal (1/448 is inexact, so about half the scales would be one ulp off the correctly
    rounded quotient the CPU and the Triton quantizers compute, and weights quantized on a GPU would differ from
    the same weights quantized on the CPU)."""
    amax = amax.float()
    return torch.where(amax == 0, torch.ones_like(amax), amax / torch.full_like(amax, FP8_MAX))


def _cast(x_over_scale: torch.Tensor) -> torch.Tensor:
    """Clamp to the e4m3 range then round to nearest even (clamp keeps NaN: NaN in, NaN code out)."""
    return x_over_scale.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _check_float(x: torch.Tensor, what: str, min_dim: int) -> None:
    if not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"{what}: expects a floating-point tensor to quantize, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{what}: expects at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def quantize_lastdim(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per vector along the last dimension: (..., K) -> codes (..., K), fp32 scale (...)."""
    _check_float(x, "quantize_lastdim", 1)
    xf = x.float()
    scale = _scale_from_amax(xf.abs().amax(dim=-1))
    return _cast(xf / scale[..., None]), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row activation quantization: x (M, K) -> (codes (M, K) e4m3fn, scale (M,) fp32)."""
    _check_float(x, "quantize_rows", 2)
    if x.dim() != 2:
        raise ValueError(f"quantize_rows: expects (rows, K), got shape {tuple(x.shape)}")
    return quantize_lastdim(x)


def quantize_channels(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel weight quantization: w (..., N, K) -> (codes (..., N, K), scale (..., N) fp32). Works on
    a stacked routed weight (E, P, N, K) as on one (N, K)."""
    _check_float(w, "quantize_channels", 2)
    return quantize_lastdim(w)


def _pad_to(x: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    """Zero-pad ``dim`` up to a multiple (zeros never raise a group's amax, so a ragged last group is exact)."""
    size = x.shape[dim]
    pad = -size % multiple
    if not pad:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def norm_bound_scale(weight: torch.Tensor) -> torch.Tensor:
    """Static FP8 scale of an RMSNorm's output, per expert: weight (E, K) -> fp32 (E,) = sqrt(K) * max|w_e| / 448.

    The bound: for any row, ``sum_j x_j^2 = K * mean(x^2) <= K * (mean(x^2) + eps)``, so ``|x_i| / rms(x) <=
    sqrt(K)`` and every normalized output ``|w_i x_i / rms(x)| <= sqrt(K) max|w|``: no row's codes can pass 448
    (beyond the bf16 roundings of the normalized value, which the clamp absorbs) whatever the input, so the scale
    can be a constant of the weights. Each factor in fp32, correctly rounded (sqrt, product, quotient), so the
    fused Triton norm computes the same bits from the same weight row. An all-zero weight gets 1.0 (zero rule); a
    NaN weight gives NaN."""
    _check_float(weight, "norm_bound_scale", 2)
    if weight.dim() != 2:
        raise ValueError(f"norm_bound_scale: expects weights (experts, K), got shape {tuple(weight.shape)}")
    w = weight.float()
    root_k = torch.sqrt(torch.full((), float(w.shape[1]), dtype=torch.float32, device=w.device))
    return _scale_from_amax(root_k * w.abs().amax(dim=1))


def quantize_rows_static(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) with a given fp32 scale per row (M,) -> (codes (M, K), scale (M,)): ``q = x / scale`` clamped and
    cast as everywhere here. A row holding a NaN or an inf gets scale NaN in the output (its codes alone would have
    clamped an inf to 448: a number), so whatever reads the row dequantizes NaN, as with the computed scales."""
    _check_float(x, "quantize_rows_static", 2)
    if x.dim() != 2 or scale.shape != (x.shape[0],):
        raise ValueError(f"quantize_rows_static: expects x (rows, K) and scale (rows,), got {tuple(x.shape)} and "
                         f"{tuple(scale.shape)}")
    xf, scale = x.float(), scale.float()
    bad = ~torch.isfinite(xf).all(dim=1)
    return _cast(xf / scale[:, None]), torch.where(bad, torch.full_like(scale, float("nan")), scale)


def quantize_row_groups(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``group`` activation quantization: x (M, K) -> (codes (M, K), scale (M, ceil(K / group)) fp32)."""
    _check_float(x, "quantize_row_groups", 2)
    if x.dim() != 2:
        raise ValueError(f"quantize_row_groups: expects (rows, K), got shape {tuple(x.shape)}")
    m, k = x.shape
    xp = _pad_to(x.float(), 1, group).view(m, -1, group)
    q, scale = quantize_lastdim(xp)
    return q.view(m, -1)[:, :k], scale


def quantize_blocks(w: torch.Tensor, block: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """``block`` x ``block`` weight quantization: w (..., N, K) -> (codes (..., N, K), scale (..., ceil(N/b),
    ceil(K/b)) fp32)."""
    _check_float(w, "quantize_blocks", 2)
    *lead, n, k = w.shape
    wp = _pad_to(_pad_to(w.float(), -1, block), -2, block)
    nb, kb = wp.shape[-2] // block, wp.shape[-1] // block
    tiles = wp.reshape(*lead, nb, block, kb, block).transpose(-3, -2)  # (..., nb, kb, block, block)
    scale = _scale_from_amax(tiles.abs().amax(dim=(-2, -1)))
    q = _cast(tiles / scale[..., None, None])
    q = q.transpose(-3, -2).reshape(*lead, nb * block, kb * block)[..., :n, :k]
    return q.contiguous(), scale


def quantize_tensor(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor quantization: x (any shape, >= 1 dim) -> (codes, scale () fp32 0-dim) with ``amax`` over every
    element (same arithmetic, zero and NaN/inf rules as the others: one non-finite value makes every code's
    dequantization NaN); an empty tensor gets scale 1."""
    _check_float(x, "quantize_tensor", 1)
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else xf.new_zeros(())  # no rows: the all-zero rule (scale 1)
    scale = _scale_from_amax(amax)
    return _cast(xf / scale), scale


# ---- dequantization (what the scales mean) ----

def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """codes (..., K) x scale (...) -> fp32; also the per-channel weight inverse."""
    return q.float() * scale.float()[..., None]


dequantize_channels = dequantize_rows


def dequantize_row_groups(q: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    k = q.shape[-1]
    return q.float() * scale.float().repeat_interleave(group, dim=-1)[..., :k]


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = GROUP) -> torch.Tensor:
    n, k = q.shape[-2:]
    s = scale.float().repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return q.float() * s[..., :n, :k]


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale.float()
