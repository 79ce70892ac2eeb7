"""RMSNorm (reference). One row, one fixed reduction order: the statistics are computed in fp32 per row."""
from __future__ import annotations

import torch


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
