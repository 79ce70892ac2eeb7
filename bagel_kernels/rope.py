"""Rotary position embedding (rotate-half, Qwen2 convention) — reference."""
from __future__ import annotations

import torch


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (tokens, head_dim) in fp32 for integer positions."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if not 1 < theta < float("inf"):  # 0 or a negative base gives NaN/inf frequencies; 1 makes every frequency 1
        raise ValueError(f"RoPE theta (rope_theta) must be a finite number > 1, got {theta}")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (tokens, heads, head_dim); cos/sin: (tokens, head_dim). Math in x's dtype promoted with the tables."""
    c, s = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return (x * c) + (_rotate_half(x) * s)
