"""Log-sum-exp merge of partial attention outputs (fast ring mode; tolerance-exact, not bitwise)."""
from __future__ import annotations

import torch


def merge_attention_partials(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets. out: (T, H, D), lse: (T, H) fp32 natural log."""
    # shape metadata only (no device read): a mismatch would otherwise broadcast or fail deep inside torch
    if out_a.dim() != 3 or out_a.shape != out_b.shape:
        raise ValueError(f"merge_attention_partials: outputs must both be (T, H, D), got {tuple(out_a.shape)} and "
                         f"{tuple(out_b.shape)}")
    if lse_a.shape != out_a.shape[:2] or lse_b.shape != out_b.shape[:2]:
        raise ValueError(f"merge_attention_partials: lse must be (T, H) = {tuple(out_a.shape[:2])} like its output, "
                         f"got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}")
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse
