"""Peer of the packed denoise step: the same generation forward written plainly in PyTorch and torch.compile'd.

What a competent engineer would write without our kernels: cuBLAS linears (``F.linear``, QKV and gate/up fused per
expert), scaled_dot_product_attention per job (cuDNN / flash, GQA native), RMSNorm / QK-norm / RoPE / SwiGLU in plain
torch for Inductor to fuse; jobs batched as (jobs, latents, hidden) so each expert projection is ONE GEMM over the
latent rows of every job (markers: one small GEMM). It reads the weights of a ``BagelModel``, does the same work as
``bagel_model.engine.step.PackedStep`` for the same jobs (deduplicated the same way), and the whole step is
replayed from one CUDA graph like ours. Tolerance-level equal to ours (bf16 rounding differs), never bitwise.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class ExpertWeights:
    in_norm: torch.Tensor
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    o_w: torch.Tensor
    post_norm: torch.Tensor
    gate_up_w: torch.Tensor
    down_w: torch.Tensor


def expert_weights(layer, gen: bool) -> ExpertWeights:
    s = "_moe_gen" if gen else ""
    a = layer.self_attn
    mlp = layer.mlp_moe_gen if gen else layer.mlp
    cat = lambda *ts: torch.cat(ts).contiguous()  # noqa: E731
    return ExpertWeights(
        getattr(layer, "input_layernorm" + s).weight,
        cat(*(getattr(a, p + s).weight for p in ("q_proj", "k_proj", "v_proj"))),
        cat(*(getattr(a, p + s).bias for p in ("q_proj", "k_proj", "v_proj"))),
        getattr(a, "q_norm" + s).weight, getattr(a, "k_norm" + s).weight, getattr(a, "o_proj" + s).weight,
        getattr(layer, "post_attention_layernorm" + s).weight,
        cat(mlp.gate_proj.weight, mlp.up_proj.weight), mlp.down_proj.weight)


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def qk_norm_rope(t: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    tf = t.float()
    tf = tf * torch.rsqrt(tf.pow(2).mean(-1, keepdim=True) + eps) * w.float()
    return (tf * cos + rotate_half(tf) * sin).to(t.dtype)


def expert_qkv(h, w: ExpertWeights, cos, sin, nh, nkv, d, eps):
    a = rms(h, w.in_norm, eps)
    qkv = F.linear(a, w.qkv_w, w.qkv_b)
    q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
    q = qk_norm_rope(q.unflatten(-1, (nh, d)), w.q_norm, cos, sin, eps)
    k = qk_norm_rope(k.unflatten(-1, (nkv, d)), w.k_norm, cos, sin, eps)
    return q, k, v.unflatten(-1, (nkv, d))


def expert_out(h, attn, w: ExpertWeights, eps):
    h = h + F.linear(attn.flatten(-2), w.o_w)
    a = rms(h, w.post_norm, eps)
    g, u = F.linear(a, w.gate_up_w).chunk(2, dim=-1)
    return h + F.linear(F.silu(g) * u, w.down_w)


def mot_layer(h_lat, h_mk, cos, sin, ctx_k: list, ctx_v: list, gen: ExpertWeights, und: ExpertWeights,
              nh: int, nkv: int, d: int, eps: float):
    """h_lat (J, N, H): every job's latents; h_mk (J, 2, H): its markers; cos/sin (J, 1, 1, D); ctx_*: per job
    (L_j, nkv, D) or None. Each job attends [its context, marker, latents, marker]."""
    ql, kl, vl = expert_qkv(h_lat, gen, cos, sin, nh, nkv, d, eps)
    qm, km, vm = expert_qkv(h_mk, und, cos, sin, nh, nkv, d, eps)
    seq = lambda m, l: torch.cat([m[:, :1], l, m[:, 1:]], dim=1)  # noqa: E731
    q, k, v = seq(qm, ql), seq(km, kl), seq(vm, vl)
    outs = []
    for j in range(q.shape[0]):
        kj, vj = k[j], v[j]
        if ctx_k[j] is not None:
            kj, vj = torch.cat([ctx_k[j], kj]), torch.cat([ctx_v[j], vj])
        o = F.scaled_dot_product_attention(q[j].transpose(0, 1)[None], kj.transpose(0, 1)[None],
                                           vj.transpose(0, 1)[None], enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    o = torch.stack(outs)
    o_lat, o_mk = o[:, 1:-1], torch.stack([o[:, 0], o[:, -1]], dim=1)
    return expert_out(h_lat, o_lat, gen, eps), expert_out(h_mk, o_mk, und, eps)


class TorchStep:
    """The peer step for fixed jobs: ``__call__(h_lat, h_mk)`` runs the layer stack, the final norms and llm2vae."""

    def __init__(self, model, contexts: list, rope_positions: list[int], compile: bool = True):
        cfg = model.cfg
        self.nh, self.nkv, self.d, self.eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.llm.rms_norm_eps
        layers = model.language_model.model.layers
        self.w = [(expert_weights(l, True), expert_weights(l, False)) for l in layers]
        body = model.language_model.model
        self.norm_gen, self.norm_und = body.norm_moe_gen.weight, body.norm.weight
        self.llm2vae = model.llm2vae
        dev = model.device
        pos = torch.tensor(rope_positions, device=dev)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.d, 2, device=dev).float() / self.d))
        emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)
        self.cos, self.sin = emb.cos()[:, None, None], emb.sin()[:, None, None]
        self.ctx = contexts  # per job: list over layers of (k, v) or None
        self.layer = torch.compile(mot_layer, fullgraph=True, dynamic=False) if compile else mot_layer

    def __call__(self, h_lat: torch.Tensor, h_mk: torch.Tensor) -> torch.Tensor:
        for i, (gen, und) in enumerate(self.w):
            ck = [c[i][0] if c is not None else None for c in self.ctx]
            cv = [c[i][1] if c is not None else None for c in self.ctx]
            h_lat, h_mk = self.layer(h_lat, h_mk, self.cos, self.sin, ck, cv, gen, und, self.nh, self.nkv, self.d,
                                     self.eps)
        h = rms(h_lat, self.norm_gen, self.eps)
        return F.linear(h, self.llm2vae.weight, self.llm2vae.bias).float()
