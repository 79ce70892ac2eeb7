"""Classifier-free guidance combination (BAGEL's three branches: full, no-text, no-image) — a pure function.

Deterministic and shape-stable, so every rank of a CFG-parallel run computes the identical result locally from the
all-gathered velocities (no broadcast in the loop).

Deliberate difference from upstream BAGEL: the combination (and its renorm) runs in fp32 on fp32 velocities, where
upstream combines in the branches' dtype (bf16 in a bf16 run). With fp32 weights both agree to rounding; in bf16 ours
is the more accurate of the two, and it keeps the Euler update's fp32 x free of a bf16 rounding per step.
"""
from __future__ import annotations

import torch

from ..core.sampling import RENORM_TYPES, SamplingParams


def combine_cfg(v: torch.Tensor, v_text: torch.Tensor | None, v_img: torch.Tensor | None, *, text_scale: float,
                img_scale: float, renorm_min: float, renorm_type: str) -> torch.Tensor:
    """v: full-context velocity; v_text: without the text prompt; v_img: without the input image. (tokens, dim)."""
    if renorm_type not in RENORM_TYPES:
        raise ValueError(f"unknown cfg renorm type {renorm_type!r}; expected one of {RENORM_TYPES}")
    if text_scale <= 1.0:
        return v
    if v_text is None or (img_scale > 1.0 and v_img is None):
        raise ValueError("CFG with text_scale > 1 needs the no-text velocity (and no-image when img_scale > 1)")
    v_t = v_text + text_scale * (v - v_text)
    if renorm_type == "text_channel":
        scale = (torch.norm(v, dim=-1, keepdim=True) / (torch.norm(v_t, dim=-1, keepdim=True) + 1e-8))
        v_t = v_t * scale.clamp(min=renorm_min, max=1.0)
        return v_img + img_scale * (v_t - v_img) if img_scale > 1.0 else v_t
    out = v_img + img_scale * (v_t - v_img) if img_scale > 1.0 else v_t
    if renorm_type == "global":
        scale = torch.norm(v) / (torch.norm(out) + 1e-8)
    else:
        scale = torch.norm(v, dim=-1, keepdim=True) / (torch.norm(out, dim=-1, keepdim=True) + 1e-8)
    return out * scale.clamp(min=renorm_min, max=1.0)



def cfg_update(x: torch.Tensor, velocities: dict[str, torch.Tensor], p: SamplingParams, dt: float) -> torch.Tensor:
    """One Euler step of a request: its branches' velocities (``"full"``, and ``"text"``/``"img"`` where the step
    runs them) combined by ``combine_cfg`` with the scales of the branches present, then ``x - v * dt`` in fp32."""
    n = len(velocities)
    v = combine_cfg(velocities["full"], velocities.get("text"), velocities.get("img"),
                    text_scale=p.cfg_text_scale if n > 1 else 1.0, img_scale=p.cfg_img_scale if n > 2 else 1.0,
                    renorm_min=p.cfg_renorm_min, renorm_type=p.cfg_renorm_type)
    return x - v.float() * dt
