"""Qwen2 Mixture-of-Transformers decoder layer (BAGEL): two experts per layer, one joint attention.

Every per-token operation is routed by ``ExpertSegments`` (host-side layout, no device reads). Attention is one
call to ``bagel_kernels.joint_attention`` through an ``AttentionFn`` so that parallel strategies (Ulysses, Ring)
can replace how K/V are exchanged without touching the layer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from bagel_kernels import (ContiguousKV, ExpertSegments, PagedKV, apply_rope_reference, invariant_linear,
                           joint_attention, rms_norm_reference)
from bagel_kernels.linear import routed_apply


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm_reference(x, self.weight, self.eps)


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = invariant_linear(x, self.gate_proj.weight)
        u = invariant_linear(x, self.up_proj.weight)
        return invariant_linear(torch.nn.functional.silu(g) * u, self.down_proj.weight)


@dataclass
class LayerInputs:
    """What every layer of one forward shares."""

    routing: ExpertSegments
    cos: torch.Tensor  # (rows, head_dim) fp32
    sin: torch.Tensor
    gen_mode: bool  # generation forward: QK-norm and RoPE in fp32 (BAGEL); prefill: in the activation dtype


class AttentionFn(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class MoTAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        h, nh, nkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        d = h // nh
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, nh, nkv, d
        eps = cfg.llm.rms_norm_eps
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(h, nh * d, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(nh * d, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(d, eps))
            setattr(self, "k_norm" + suffix, RMSNorm(d, eps))

    def _expert(self, gen: bool, name: str):
        return getattr(self, name + ("_moe_gen" if gen else ""))

    def qkv(self, x: torch.Tensor, li: LayerInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed projections, QK-norm and RoPE: q (rows, Hq, D), k/v (rows, Hkv, D) in the activation dtype."""
        d = self.head_dim

        def project(gen: bool):
            def fn(t: torch.Tensor):
                q = invariant_linear(t, self._expert(gen, "q_proj").weight, self._expert(gen, "q_proj").bias)
                k = invariant_linear(t, self._expert(gen, "k_proj").weight, self._expert(gen, "k_proj").bias)
                v = invariant_linear(t, self._expert(gen, "v_proj").weight, self._expert(gen, "v_proj").bias)
                q, k = q.view(-1, self.num_heads, d), k.view(-1, self.num_kv_heads, d)
                if li.gen_mode:  # BAGEL runs generation QK-norm in fp32
                    q, k = q.float(), k.float()
                q = self._expert(gen, "q_norm")(q)
                k = self._expert(gen, "k_norm")(k)
                return torch.cat([q.reshape(t.shape[0], -1), k.reshape(t.shape[0], -1),
                                  v.to(q.dtype).reshape(t.shape[0], -1)], dim=1)
            return fn

        fused = routed_apply(x, li.routing, project(False), project(True))
        nq, nk = self.num_heads * d, self.num_kv_heads * d
        q = fused[:, :nq].reshape(-1, self.num_heads, d)
        k = fused[:, nq:nq + nk].reshape(-1, self.num_kv_heads, d)
        v = fused[:, nq + nk:].reshape(-1, self.num_kv_heads, d)
        q = apply_rope_reference(q, li.cos, li.sin).to(x.dtype)
        k = apply_rope_reference(k, li.cos, li.sin).to(x.dtype)
        return q.contiguous(), k.contiguous(), v.to(x.dtype).contiguous()

    def out(self, attn: torch.Tensor, li: LayerInputs) -> torch.Tensor:
        flat = attn.reshape(attn.shape[0], -1)
        return routed_apply(flat, li.routing, lambda t: invariant_linear(t, self.o_proj.weight),
                            lambda t: invariant_linear(t, self.o_proj_moe_gen.weight))


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.llm.rms_norm_eps
        self.layer_idx = layer_idx
        self.self_attn = MoTAttention(cfg, layer_idx)
        self.mlp = MLP(h, cfg.llm.intermediate_size)
        self.mlp_moe_gen = MLP(h, cfg.llm.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.input_layernorm_moe_gen = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, li: LayerInputs, attention: AttentionFn,
                kv_sink: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
        r = li.routing
        h = routed_apply(x, r, self.input_layernorm, self.input_layernorm_moe_gen)
        q, k, v = self.self_attn.qkv(h, li)
        if kv_sink is not None:  # prefill: the context cache keeps K after k_norm + RoPE
            kv_sink(self.layer_idx, k, v)
        a = attention(self.layer_idx, q, k, v)
        x = x + self.self_attn.out(a, li)
        h = routed_apply(x, r, self.post_attention_layernorm, self.post_attention_layernorm_moe_gen)
        return x + routed_apply(h, r, self.mlp, self.mlp_moe_gen)


def local_attention(contexts: list[ContiguousKV | PagedKV | None], valid_len: int,
                    visible_end: torch.Tensor | None = None, gqa_group: int | None = None,
                    q_head_offset: int = 0) -> AttentionFn:
    """Queries see [context of the layer, the current tokens' own K/V (first valid_len)] without communication.

    ``gqa_group``/``q_head_offset`` serve a rank that holds a slice of the heads (Ulysses)."""

    lens: list[torch.Tensor] = []  # made once per forward, on the device, by a fill (no host-to-device copy)

    def fn(layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if not lens:
            lens.append(torch.full((1,), valid_len, dtype=torch.int32, device=k.device))
        segs = []
        ctx = contexts[layer_idx] if contexts else None
        if ctx is not None:
            segs.append(ctx)
        segs.append(ContiguousKV(k, v, seqlens=lens[0]))
        return joint_attention(q, segs, visible_end=visible_end, gqa_group=gqa_group, q_head_offset=q_head_offset).out

    return fn
