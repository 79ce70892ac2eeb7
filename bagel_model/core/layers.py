"""Qwen2 Mixture-of-Transformers decoder layer (BAGEL): two experts per layer, one joint attention.

Every per-token operation is one routed kernel from ``bagel_kernels`` (routing by ``ExpertSegments``: host-side
layout, and a per-row expert id tensor built once per forward on the device): routed RMSNorm, one fused QKV
GEMM, QK-norm + RoPE, attention through an ``AttentionFn`` (so that parallel strategies can replace how K/V are
exchanged without touching the layer), o_proj with the residual add fused, SwiGLU gate/up in one GEMM, and down
with the residual. Parameters keep the released names; ``ExpertPack`` stacks them for the kernels in place.

``KernelOptions(quantization="fp8")``: the four projections (QKV, o_proj, gate/up, down) of both experts run
``routed_linear_fp8`` on the packs' FP8 codes and per-channel scales (``project``); norms, QK-norm/RoPE and the
attention are unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from bagel_kernels import (ContiguousKV, ExpertSegments, KernelOptions, PagedKV, PagedKVView, QuantizedRows,
                           default_options, joint_attention, qk_norm_rope, rms_norm_reference, routed_linear,
                           routed_linear_fp8, routed_rms_norm, routed_rms_norm_fp8)
from bagel_kernels.kv_layout import TokenSlots

from .expert_pack import ExpertPack


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


@dataclass
class LayerInputs:
    """What every layer of one forward shares."""

    routing: ExpertSegments
    cos: torch.Tensor  # (rows, head_dim) fp32
    sin: torch.Tensor
    gen_mode: bool  # generation forward: QK-norm and RoPE in fp32 (BAGEL); prefill: in the activation dtype
    # AR decode (a few rows): projections take the small-batch GEMM (bagel_kernels.routed_linear). Never set for
    # the denoiser, whose rows must match across parallel layouts bit for bit.
    small_batch: bool = False
    kernels: KernelOptions = field(default_factory=default_options)  # every kernel call of the forward gets these
    _ids: torch.Tensor | None = field(default=None, repr=False)

    def expert_ids(self, device: torch.device) -> torch.Tensor | None:
        """Per-row expert ids on the device, made once per forward (CPU reference kernels route by segments)."""
        if device.type != "cuda":
            return None
        if self._ids is None:
            self._ids = self.routing.expert_ids(device)
        return self._ids


class AttentionFn(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


KVSink = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer, k, v) after k_norm + RoPE: the context cache


@dataclass(frozen=True)
class SlotSink:
    """A K/V sink whose tokens go to fixed (page, slot)s of every layer's paged cache (``token_slots``, the same
    for all layers). The layer hands it to QK-norm + RoPE, whose kernel stores k and v there itself
    (``qk_norm_rope(..., kv_out=)``, the values ``write_token_slots`` would write): text decoding's token step then
    launches no scatter per layer."""

    views: list[PagedKVView]
    pages: torch.Tensor
    slots: torch.Tensor

    def target(self, layer_idx: int) -> TokenSlots:
        return TokenSlots(self.views[layer_idx], self.pages, self.slots)


def experts_pack(module: nn.Module, *names: str, attr: str = "weight", quantizable: bool = False) -> ExpertPack:
    """Pack ``attr`` of ``name`` (und) and ``name_moe_gen`` (gen) of ``module``, the names fused along N."""
    return ExpertPack([[[(getattr(module, n + sfx), attr) for n in names]] for sfx in ("", "_moe_gen")],
                      quantizable=quantizable)


def _norm(x: torch.Tensor, li: LayerInputs, weight: torch.Tensor, eps: float, *,
          before_qkv: bool = False) -> torch.Tensor | QuantizedRows:
    """The RMSNorm before a projection. FP8 with per-row activation scales: it writes the projection's FP8 input
    (``routed_rms_norm_fp8``: the same codes as quantizing its bf16 output, without that output); with
    ``fp8_activation_scaling="qkv_bound"`` the norm before QKV (``before_qkv``) quantizes with its static bound."""
    ids, opts = li.expert_ids(x.device), li.kernels
    if opts.quantization == "fp8" and opts.fp8_activation_scaling in ("row", "qkv_bound"):
        static = before_qkv and opts.fp8_activation_scaling == "qkv_bound"
        return routed_rms_norm_fp8(x, li.routing, weight, eps, static_bound=static, expert_ids=ids, options=opts)
    return routed_rms_norm(x, li.routing, weight, eps, expert_ids=ids, options=opts)


def project(x: torch.Tensor | QuantizedRows, li: LayerInputs, pack: ExpertPack, bias: torch.Tensor | None = None, *,
            activation=None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """One routed projection of the layer: ``routed_linear`` on the packed weight, or with
    ``quantization="fp8"`` ``routed_linear_fp8`` on its codes and scales (same epilogues; decode's few rows take
    either's small-batch kernel)."""
    ids = li.expert_ids(x.device)
    if li.kernels.quantization == "fp8":
        wq, ws = pack.get_fp8()
        return routed_linear_fp8(x, li.routing, wq, ws, bias, activation=activation, residual=residual,
                                 expert_ids=ids, options=li.kernels, small_batch=li.small_batch)
    return routed_linear(x, li.routing, pack.get(), bias, activation=activation, residual=residual, expert_ids=ids,
                         small_batch=li.small_batch, options=li.kernels)


class MoTAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        h, nh, nkv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads
        d = h // nh
        self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim = layer_idx, nh, nkv, d
        self.eps = cfg.llm.rms_norm_eps
        for suffix in ("", "_moe_gen"):
            setattr(self, "q_proj" + suffix, nn.Linear(h, nh * d, bias=True))
            setattr(self, "k_proj" + suffix, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "v_proj" + suffix, nn.Linear(h, nkv * d, bias=True))
            setattr(self, "o_proj" + suffix, nn.Linear(nh * d, h, bias=False))
            setattr(self, "q_norm" + suffix, RMSNorm(d, self.eps))
            setattr(self, "k_norm" + suffix, RMSNorm(d, self.eps))
        self._qkv_w = experts_pack(self, "q_proj", "k_proj", "v_proj", quantizable=True)
        self._qkv_b = experts_pack(self, "q_proj", "k_proj", "v_proj", attr="bias")
        self._o_w = experts_pack(self, "o_proj", quantizable=True)
        self._q_norm = experts_pack(self, "q_norm")
        self._k_norm = experts_pack(self, "k_norm")

    def qkv(self, x: torch.Tensor, li: LayerInputs, kv_out: TokenSlots | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Routed fused QKV, QK-norm and RoPE: q (rows, Hq, D), k/v (rows, Hkv, D) in the activation dtype;
        ``kv_out``: k and v also written into a paged cache by the same kernel."""
        ids = li.expert_ids(x.device)
        fused = project(x, li, self._qkv_w, self._qkv_b.get())
        return qk_norm_rope(fused, li.routing, self._q_norm.get()[:, 0], self._k_norm.get()[:, 0], li.cos, li.sin,
                            self.num_heads, self.num_kv_heads, self.eps, li.gen_mode, expert_ids=ids,
                            options=li.kernels, kv_out=kv_out)

    def out(self, attn: torch.Tensor, li: LayerInputs, residual: torch.Tensor) -> torch.Tensor:
        """``residual + o_proj(attn)`` routed per expert."""
        return project(attn.reshape(attn.shape[0], -1), li, self._o_w, residual=residual)


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.llm.rms_norm_eps
        self.layer_idx, self.eps = layer_idx, eps
        self.self_attn = MoTAttention(cfg, layer_idx)
        self.mlp = MLP(h, cfg.llm.intermediate_size)
        self.mlp_moe_gen = MLP(h, cfg.llm.intermediate_size)
        self.input_layernorm = RMSNorm(h, eps)
        self.input_layernorm_moe_gen = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm_moe_gen = RMSNorm(h, eps)
        self._in_norm = experts_pack(self, "input_layernorm")
        self._post_norm = experts_pack(self, "post_attention_layernorm")
        mlps = (self.mlp, self.mlp_moe_gen)
        self._gate_up = ExpertPack([[[(m.gate_proj, "weight")], [(m.up_proj, "weight")]] for m in mlps],
                                   quantizable=True)
        self._down = ExpertPack([[[(m.down_proj, "weight")]] for m in mlps], quantizable=True)

    def forward(self, x: torch.Tensor, li: LayerInputs, attention: AttentionFn,
                kv_sink: KVSink | SlotSink | None = None) -> torch.Tensor:
        h = _norm(x, li, self._in_norm.get()[:, 0], self.eps, before_qkv=True)
        slots = kv_sink.target(self.layer_idx) if isinstance(kv_sink, SlotSink) else None
        q, k, v = self.self_attn.qkv(h, li, kv_out=slots)
        if kv_sink is not None and slots is None:  # prefill: the context cache keeps K after k_norm + RoPE
            kv_sink(self.layer_idx, k, v)
        x = self.self_attn.out(attention(self.layer_idx, q, k, v), li, residual=x)
        h = _norm(x, li, self._post_norm.get()[:, 0], self.eps)
        g = project(h, li, self._gate_up, activation="swiglu")
        return project(g, li, self._down, residual=x)


def local_attention(contexts: list[ContiguousKV | PagedKV | None], valid_len: int,
                    visible_end: torch.Tensor | None = None, gqa_group: int | None = None,
                    q_head_offset: int = 0, options: KernelOptions | None = None) -> AttentionFn:
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
        return joint_attention(q, segs, visible_end=visible_end, gqa_group=gqa_group, q_head_offset=q_head_offset,
                               options=options).out

    return fn
