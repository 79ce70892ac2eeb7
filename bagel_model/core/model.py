"""BagelModel: the Qwen2-MoT language model, generation embeddings, ViT connector and the FLUX VAE.

Module names mirror the released checkpoint's tensor keys (``language_model.model.layers.{i}...``,
``time_embedder.mlp.{0,2}``, ``vae2llm``, ``llm2vae``, ``latent_pos_embed.pos_embed``, ...), so loading is a strict
key-for-key copy. The VAE lives in ``self.vae`` and is stored separately (``ae.safetensors``).
"""
from __future__ import annotations

import math
import zlib
from typing import Callable

import torch
from torch import nn
from transformers import SiglipVisionModel

from bagel_kernels import KernelOptions, default_options, invariant_linear, rope_cos_sin, routed_rms_norm
from bagel_kernels.fp8_quant import FP8_DTYPE
from bagel_kernels.routed_linear_fp8 import require_fp8_support

from .config import BagelConfig
from .embeddings import PositionEmbedding, TimestepEmbedder, sincos_2d_table
from .layers import AttentionFn, LayerInputs, MoTDecoderLayer, RMSNorm, experts_pack
from .expert_pack import ExpertPack
from .vae import AutoEncoder


class _LMBody(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.llm.vocab_size, h)
        self.layers = nn.ModuleList([MoTDecoderLayer(cfg, i) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(h, cfg.llm.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(h, cfg.llm.rms_norm_eps)
        self._final_norm = experts_pack(self, "norm")


class _LanguageModel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.model = _LMBody(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.llm.vocab_size, bias=False)


class Connector(nn.Module):
    """ViT -> LLM 2-layer MLP (GELU, tanh approximation)."""

    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(cin, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x), approximate="tanh"))


def _siglip_with_release_prefix(vit_cfg) -> nn.Module:
    """SigLIP whose state-dict keys read ``vision_model.*`` (the release's ``vit_model.vision_model.*``) on every
    transformers version: 4.x nests ``vision_model`` inside SiglipVisionModel, 5.x flattens it."""
    vit = SiglipVisionModel(vit_cfg)
    if "vision_model" in dict(vit.named_children()):
        return vit
    holder = nn.Module()
    holder.vision_model = vit
    return holder


_HASH_MUL = 0x7FEB352D  # < 2**31: a 32-bit value times it stays exact in int64 on every backend


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply rounds) on int64 tensors holding values in [0, 2**32)."""
    mask = 0xFFFFFFFF
    for shift in (16, 15, 16):
        x = x ^ (x >> shift)
        x = (x * _HASH_MUL) & mask
    return x


def counter_normal_(out: torch.Tensor, std: float, seed: int, name: str, chunk: int = 1 << 24) -> torch.Tensor:
    """Fill ``out`` with N(0, std²) values that depend only on (seed, name, element index): element-wise integer
    hashing and Box-Muller, no launch-dependent random streams, so every device and partition draws the same."""
    key = zlib.crc32(f"{seed}:{name}".encode())
    flat = out.view(-1)
    for start in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - start)
        idx = torch.arange(start, start + n, dtype=torch.int64, device=out.device)
        h1 = _hash32(_hash32(idx ^ key) ^ 0x5BD1E995)
        h2 = _hash32(_hash32(idx ^ (key ^ 0x68E31DA4)) ^ 0x1B873593)
        u1 = (h1.double() + 0.5) / 2.0 ** 32  # in (0, 1): the log is finite
        u2 = h2.double() / 2.0 ** 32
        z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
        flat[start:start + n].copy_((z * std).float())
    return out


class BagelModel(nn.Module):
    """``kernels``: the kernel options every forward of this model runs with (``bagel_kernels.KernelOptions``;
    None: the process default). Set it at construction or assign it later (``model.kernels = ...``)."""

    def __init__(self, cfg: BagelConfig, kernels: KernelOptions | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.kernels = kernels if kernels is not None else default_options()
        h = cfg.hidden_size
        self.language_model = _LanguageModel(cfg)
        self.time_embedder = TimestepEmbedder(h)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, h)
        self.llm2vae = nn.Linear(h, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, h)
        if cfg.vit is not None:
            self.vit_model = _siglip_with_release_prefix(cfg.vit)
            self.connector = Connector(cfg.vit.hidden_size, h)
            self.vit_pos_embed = PositionEmbedding(cfg.vit_max_num_patch_per_side, h)
        self.vae = AutoEncoder(cfg.vae)

    # ---- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def random(cfg: BagelConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", kernels: KernelOptions | None = None) -> "BagelModel":
        """Random weights from a seeded generator: identical on every rank and every run (``kernels`` with
        ``quantization="fp8"``: drawn in ``dtype`` and quantized layer by layer as drawn)."""
        require_fp8_support(kernels, device, dtype)  # before anything is allocated
        with torch.device("meta"):
            model = BagelModel(cfg, kernels)
        device = torch.device(device)
        # Cast on the meta device, then allocate: a 7B model never exists in fp32 on the GPU.
        model = model.to_dtype(dtype)
        model.eval().requires_grad_(False)
        prefix = {m: name for name, m in model.named_modules()}

        def draw(unit: nn.Module) -> None:
            unit.to_empty(device=device)
            # Initialize where the weights live (a 7B model would take minutes on one CPU thread), with a
            # counter-based generator: each value is a hash of (seed, parameter name, element index), so the weights
            # are the same on every device and every GPU partition (torch's CUDA generator is not: its streams follow
            # the launch grid, which follows the SM count — an MPS-capped process drew other weights). Drawn in fp32
            # chunk by chunk and copied in, without ever holding an fp32 copy of a 7B model.
            for local, p in unit.named_parameters():
                name = f"{prefix[unit]}.{local}"
                if name.endswith("pos_embed"):
                    grid = cfg.max_latent_size if name.startswith("latent") else cfg.vit_max_num_patch_per_side
                    p.data.copy_(sincos_2d_table(cfg.hidden_size, grid).to(device))
                elif "norm" in name.split(".")[-2]:  # RMSNorm, LayerNorm, GroupNorm: identity at start
                    p.data.fill_(1.0) if name.endswith("weight") else p.data.zero_()
                else:
                    std = 0.02 if p.dim() == 1 or not name.startswith("vae.") else (1.0 / max(1, p[0].numel())) ** 0.5
                    counter_normal_(p.data, std, seed, name)

        # Allocated, drawn and packed one unit (a decoder layer, or another top-level module) at a time: with FP8
        # each layer is quantized before the next is drawn, so peak memory is the FP8 model plus one float layer.
        model._pack_units(draw)
        model.reset_position_ids()
        return model

    def placement_units(self) -> list[nn.Module]:
        """The model as disjoint modules that together hold every parameter and buffer: each decoder layer, then
        every other child of the containers above them. Placing (``place``) or drawing (``random``) one unit at a
        time bounds peak memory by one unit."""
        body = self.language_model.model
        containers = (*self._containers(), body.layers)
        for c in containers:
            if next(c.parameters(recurse=False), None) is not None or next(c.buffers(recurse=False), None) is not None:
                raise RuntimeError(f"placement_units: {type(c).__name__} holds tensors of its own")
        units: list[nn.Module] = list(body.layers)
        for c in containers[:3]:
            units += [m for m in c.children() if all(m is not k for k in containers)]
        return units

    def _containers(self) -> list[nn.Module]:
        body = self.language_model.model
        return [self, self.language_model, body]

    def _pack_units(self, prepare: Callable[[nn.Module], None] | None = None) -> "BagelModel":
        """For each placement unit in turn: ``prepare`` it (allocate and draw, or move), then pack it; then the
        containers' own packs (the final norm's)."""
        fp8 = self.kernels.quantization == "fp8"
        for unit in self.placement_units():
            if prepare is not None:
                prepare(unit)
            self._pack_unit(unit, fp8)
        for c in self._containers():
            self._pack_unit(c, fp8, recurse=False)
        return self

    def _pack_unit(self, unit: nn.Module, fp8: bool, recurse: bool = True) -> None:
        """Build ``unit``'s expert packs (FP8 ones quantized), then hand the replaced storage back to the device.
        ``recurse=False``: only the packs of ``unit`` itself (a container's, such as the final norm's)."""
        packs = [v for m in (unit.modules() if recurse else (unit,)) for v in vars(m).values()
                 if isinstance(v, ExpertPack)]
        for pack in packs:
            pack.get_fp8() if pack.quantizable and (fp8 or pack.is_fp8) else pack.get()
        if packs and next(unit.parameters()).device.type == "cuda":
            torch.cuda.empty_cache()

    def place(self, device: torch.device | str) -> "BagelModel":
        """Move to ``device`` unit by unit, packing (with FP8: quantizing) each unit right after it lands: a model
        loaded in bf16 on the host reaches the GPU as FP8 without the whole bf16 copy ever being there."""
        if self.kernels.quantization == "fp8":
            require_fp8_support(self.kernels, device, self.dtype)
        return self._pack_units(lambda unit: unit.to(device))

    def pack_experts(self) -> "BagelModel":
        """Build every per-expert pack now (they are otherwise built on first use), layer by layer, handing the
        replaced parameter storage back to the device after each layer: peak memory stays at the weights plus
        one layer, instead of the caching allocator holding both copies (two 7B stages on one GPU).

        With ``self.kernels.quantization == "fp8"`` (or weights that are FP8 codes already) the MoT projections'
        packs are FP8: quantized here, once, per output channel, their float copies dropped (``ExpertPack``)."""
        if self.kernels.quantization == "fp8":
            require_fp8_support(self.kernels, self.device, self.dtype)
        return self._pack_units()

    def reset_position_ids(self) -> None:
        """Refill SigLIP's ``position_ids`` arange buffer (not stored in checkpoints, uninitialized after to_empty)."""
        for name, b in self.named_buffers():
            if name.endswith("position_ids"):
                b.data.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))

    def to_dtype(self, dtype: torch.dtype) -> "BagelModel":
        """Cast everything but the VAE, which always runs in fp32 (docs/DESIGN.md §7), and FP8 projection weights
        and their fp32 scales, which stay as they are."""
        keep = {id(t) for t in self._fp8_tensors()}
        for name, child in self.named_children():
            if name != "vae":
                child._apply(lambda t: t if id(t) in keep or not t.is_floating_point() else t.to(dtype))
        self.vae.float()
        return self

    def _fp8_packs(self) -> list[ExpertPack]:
        return [v for m in self.modules() for v in vars(m).values() if isinstance(v, ExpertPack) and v.quantizable]

    def _fp8_tensors(self) -> list[torch.Tensor]:
        """The FP8 codes (parameters) and their scale buffers (``<name>_scale``)."""
        out = []
        for m in self.modules():
            for name, p in m.named_parameters(recurse=False):
                if p.dtype == FP8_DTYPE:
                    out.append(p)
                    out.append(getattr(m, name + "_scale"))
        return out

    @property
    def is_fp8(self) -> bool:
        """Whether the MoT projections hold FP8 codes (``quantization="fp8"``, quantized or loaded)."""
        return any(p.is_fp8 for p in self._fp8_packs())

    def make_fp8_storage(self) -> "BagelModel":
        """Replace every MoT projection weight by empty FP8 codes with empty fp32 ``weight_scale`` buffers, on the
        model's device: the layout of an FP8 checkpoint, which the strict loader then fills."""
        for pack in self._fp8_packs():
            pack.make_fp8_storage(self.device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    # ---- shared pieces ------------------------------------------------------------------------------------------
    def _run_layers(self, x: torch.Tensor, li: LayerInputs, attention: AttentionFn, kv_sink=None) -> torch.Tensor:
        return self.final_norm(self.run_layers(x, li, attention, 0, self.cfg.num_layers, kv_sink), li)

    def run_layers(self, x: torch.Tensor, li: LayerInputs, attention: AttentionFn, start: int, stop: int,
                   kv_sink=None) -> torch.Tensor:
        """Decoder layers [start, stop) on the hidden rows ``x`` (the step cache runs a forward in such ranges)."""
        for layer in self.language_model.model.layers[start:stop]:
            x = layer(x, li, attention, kv_sink)
        return x

    def final_norm(self, x: torch.Tensor, li: LayerInputs) -> torch.Tensor:
        body = self.language_model.model
        return routed_rms_norm(x, li.routing, body._final_norm.get()[:, 0], body.norm.eps,
                               expert_ids=li.expert_ids(x.device), options=li.kernels)

    def _cos_sin(self, positions: torch.Tensor):
        return rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def set_marker_ids(self, start_of_image: int, end_of_image: int) -> None:
        self._marker_ids = torch.tensor([start_of_image, end_of_image], dtype=torch.long, device=self.device)

    def _latent_pos_ids_for(self, grid: tuple[int, int]) -> torch.Tensor:
        cache = getattr(self, "_pos_cache", None)
        if cache is None or cache[0] != grid:
            # built on the device (aranges): a host-built table's copy would synchronize inside the denoise loop
            h, w = grid
            r = torch.arange(h, device=self.device)[:, None]
            ids = (r * self.cfg.max_latent_size + torch.arange(w, device=self.device)[None, :]).reshape(-1)
            self._pos_cache = (grid, ids)
        return self._pos_cache[1]

    # ---- packed generation forward (every job of a step at once; bagel_model.engine.layout) ---------------------------
    @torch.no_grad()
    def packed_inputs(self, x_lat: torch.Tensor, t_jobs: torch.Tensor, layout, rope_positions: tuple[int, ...],
                      rank: int, cache: dict | None = None) -> tuple[torch.Tensor, LayerInputs]:
        """Embeddings of ``rank``'s rows of a packed forward. ``x_lat`` (all jobs' latents, packed) fp32,
        ``t_jobs`` (J,) fp32 device tensor of each job's timestep. The same per-row arithmetic as the oracle's one-branch forward:
        latents = vae2llm(x) + time_emb(t of the row's job) + pos_emb; markers from embed_tokens; zero padding.
        ``cache`` (per layout) keeps the index tensors built on the first call."""
        dev, dt = self.device, self.dtype
        cache = cache if cache is not None else {}
        r0, r1 = layout.split.rows(rank)
        n_lat, J = layout.latent_rows, layout.num_jobs
        parts = []
        a, b = min(r0, n_lat), min(r1, n_lat)
        if b > a:
            if "lat" not in cache:
                pos_ids = torch.cat([self._latent_pos_ids_for(g) for g in layout.grids])[a:b]
                cache["lat"] = (layout.job_of_latent_rows(a, b, dev), pos_ids)
            job_idx, pos_ids = cache["lat"]
            temb = self.time_embedder(t_jobs, options=self.kernels)  # (J, hidden): its rows do not depend on J
            pos = self.latent_pos_embed(pos_ids).to(dt)
            lat = invariant_linear(x_lat[a:b].to(dt), self.vae2llm.weight, self.vae2llm.bias, options=self.kernels)
            parts.append(lat + temb.index_select(0, job_idx) + pos)
        ma, mb = max(r0, n_lat), min(r1, n_lat + 2 * J)
        if mb > ma:
            parts.append(self.language_model.model.embed_tokens(self._marker_ids.repeat(J)[ma - n_lat:mb - n_lat]))
        n_pad = r1 - max(r0, n_lat + 2 * J)
        if n_pad > 0:
            parts.append(torch.zeros(n_pad, self.cfg.hidden_size, dtype=dt, device=dev))
        x = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        return x, self.packed_layer_inputs(layout, rope_positions, rank, cache)

    def packed_layer_inputs(self, layout, rope_positions: tuple[int, ...], rank: int, cache: dict) -> LayerInputs:
        """Routing and RoPE tables of ``rank``'s rows of a packed layout (each job's rows at its context's position),
        made once per layout and kept in ``cache``."""
        r0, r1 = layout.split.rows(rank)
        if "pos" not in cache:
            positions = torch.zeros(r1 - r0, dtype=torch.long, device=self.device)
            for j, p in enumerate(rope_positions):
                for s, e in layout.job_spans(j, r0, r1):
                    positions[s - r0:e - r0].fill_(p)
            cache["pos"] = self._cos_sin(positions)
        cos, sin = cache["pos"]
        return LayerInputs(routing=layout.routing(rank), cos=cos, sin=sin, gen_mode=True, kernels=self.kernels)

    @torch.no_grad()
    def packed_velocity_rows(self, x_lat: torch.Tensor, t_jobs: torch.Tensor, layout, rope_positions: tuple[int, ...],
                             rank: int, attention: AttentionFn, cache: dict | None = None) -> torch.Tensor:
        """llm2vae output (fp32) of ``rank``'s rows of a packed forward; latent rows come first in the layout."""
        x, li = self.packed_inputs(x_lat, t_jobs, layout, rope_positions, rank, cache)
        return self.velocity_head(self.run_layers(x, li, attention, 0, self.cfg.num_layers), li)

    def velocity_head(self, h: torch.Tensor, li: LayerInputs) -> torch.Tensor:
        """Final norm and llm2vae of a generation forward's last hidden rows, in fp32."""
        return invariant_linear(self.final_norm(h, li), self.llm2vae.weight, self.llm2vae.bias,
                                options=self.kernels).float()
