"""Log-sum-exp merge of partial attention outputs (fast ring mode; tolerance-exact, not bitwise)."""
from __future__ import annotations

import torch


def merge_attention_partials(out_a, lse_a, out_b, lse_b) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine two attention results over disjoint key sets. out: (T, H, D), lse: (T, H) fp32 natural log."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - safe)[..., None]
    wb = torch.exp(lse_b - safe)[..., None]
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), lse
