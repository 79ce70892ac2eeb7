"""Stage-0 work: packed multimodal prefill into a paged KV cache, and greedy text decoding.

A prompt is a list of blocks: text (understanding expert, causal), a VAE image block (the input image's latents
through the generation expert at t = 0, for editing) and a ViT image block (SigLIP + connector, understanding expert).
An image block is ``[<|vision_start|>, tokens..., <|vision_end|>]``: bidirectional inside, one shared RoPE position.
Positions, routing and the mask are built from the block layout: positions by a cumulative sum on the device (no
per-token host loop), routing as host segments, the mask as per-token span ids.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from bagel_kernels import ExpertSegments, invariant_linear, prefill_visible_end

from .kv_cache import Context, new_cache
from ..core.layers import LayerInputs, local_attention
from ..core.model import BagelModel
from ..core.transforms import to_pixels, vae_resize_rule, vit_resize_rule
from ..core.vae import patchify


@dataclass
class TextBlock:
    ids: list[int]


@dataclass
class VAEBlock:
    latents: torch.Tensor  # (h*w, patch_dim) fp32 tokens of the encoded input image
    grid: tuple[int, int]


@dataclass
class ViTBlock:
    embeddings: torch.Tensor  # (n, hidden) connector output + position embedding


Block = TextBlock | VAEBlock | ViTBlock


def image_to_pixels(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) fp32 in [-1, 1] (upstream's ToTensor + Normalize(0.5, 0.5))."""
    return to_pixels(image)


@torch.no_grad()
def vae_block(model: BagelModel, image: torch.Tensor, seed: int, noise: torch.Tensor | None = None) -> VAEBlock:
    """Resize the input image like upstream's VAE transform, encode it (posterior sampled with a seeded CPU
    generator, or with the given ``noise`` of the latent's shape) and patchify it into latent tokens."""
    image = vae_resize_rule(model.cfg)(image)
    grid = model.cfg.check_image_size(*image.shape[:2])
    z = model.vae.encode(to_pixels(image).to(model.device), torch.Generator().manual_seed(seed), noise=noise)[0]
    return VAEBlock(latents=patchify(z, model.cfg.latent_patch_size).float(), grid=grid)


@torch.no_grad()
def vit_block(model: BagelModel, image: torch.Tensor) -> ViTBlock:
    """SigLIP features of the image at its own aspect ratio, as upstream's NaViT packs them: resized like upstream's
    ViT transform, cut into a (H/p) x (W/p) patch grid (row-major), SigLIP's position embedding and BAGEL's
    ``vit_pos_embed`` both indexed by row * vit_max_num_patch_per_side + column; then the connector."""
    cfg = model.cfg
    image = vit_resize_rule(cfg)(image)  # raises a clear error when the model has no ViT
    p, side = cfg.vit.patch_size, cfg.vit_max_num_patch_per_side
    gh, gw = image.shape[0] // p, image.shape[1] // p
    if image.shape[0] % p or image.shape[1] % p or max(gh, gw) > side:
        raise ValueError(f"ViT input {tuple(image.shape[:2])} must be whole {p}-pixel patches, at most {side} per side")
    vm = model.vit_model.vision_model
    emb = vm.embeddings
    dev = model.device
    r, c = torch.arange(gh, device=dev), torch.arange(gw, device=dev)
    ids = (r[:, None] * side + c[None, :]).reshape(-1)
    if int(ids[-1]) >= emb.position_embedding.num_embeddings:
        raise ValueError(f"a {gh}x{gw} patch grid needs SigLIP position {int(ids[-1])}, but its table has "
                         f"{emb.position_embedding.num_embeddings} (vit_config image_size / patch_size per side)")
    # The Conv2d over the whole image equals upstream's Linear over (row, column, channel)-flattened patches; its
    # (E, gh, gw) output flattened row-major is upstream's patch order.
    patches = emb.patch_embedding(to_pixels(image).to(dev, model.dtype))[0].flatten(1).transpose(0, 1)
    h = vm.encoder(inputs_embeds=(patches + emb.position_embedding(ids))[None]).last_hidden_state
    feats = vm.post_layernorm(h)[0]
    return ViTBlock(embeddings=model.connector(feats) + model.vit_pos_embed(ids).to(feats.dtype))


def _embed(model: BagelModel, blocks: list[Block]) -> tuple[torch.Tensor, ExpertSegments, list[tuple[int, bool]]]:
    """Input rows of the packed prompt, their routing, and per block (tokens, shares-one-position)."""
    dev, dt = model.device, model.dtype
    emb = model.language_model.model.embed_tokens
    rows, flags, layout = [], [], []
    for b in blocks:
        if isinstance(b, TextBlock):
            if not b.ids:
                raise ValueError("a text block needs at least one token")
            rows.append(emb(torch.tensor(b.ids, dtype=torch.long, device=dev)))
            flags += [False] * len(b.ids)
            layout.append((len(b.ids), False))
            continue
        if isinstance(b, VAEBlock):
            t0 = model.time_embedder(torch.zeros(1, device=dev), options=model.kernels)
            pos = model.latent_pos_embed(model._latent_pos_ids_for(b.grid)).to(dt)
            body = invariant_linear(b.latents.to(dev, dt), model.vae2llm.weight, model.vae2llm.bias,
                                    options=model.kernels) + t0 + pos
            gen = True
        else:
            body = b.embeddings.to(dt)
            gen = False
        rows += [emb(model._marker_ids[0:1]), body, emb(model._marker_ids[1:2])]
        flags += [False] + [gen] * body.shape[0] + [False]
        layout.append((body.shape[0] + 2, True))
    return torch.cat(rows), ExpertSegments.from_flags(flags), layout


def positions_and_spans(layout: list[tuple[int, bool]], start: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """RoPE positions and mask span ids of a packed prompt, vectorized on the device.

    Text tokens advance the position by one each; an image block advances it once for all its tokens. Returns
    (positions, span_ids, next_position); next_position is computed on the host from the layout."""
    n = sum(k for k, _ in layout)
    inc = torch.ones(n, dtype=torch.long, device=device)
    span = torch.full((n,), -1, dtype=torch.int32, device=device)
    row, next_pos = 0, start
    for i, (k, shared) in enumerate(layout):
        if shared:
            inc[row + 1:row + k] = 0  # fills of a slice: block-level host work, not per token
            span[row:row + k] = i
            next_pos += 1
        else:
            next_pos += k
        row += k
    return start + torch.cumsum(inc, 0) - 1, span, next_pos


@torch.no_grad()
def prefill(model: BagelModel, blocks: list[Block], layout: str = "flash_attn", extra_capacity: int = 0,
            context: Context | None = None, small_batch: bool = False) -> tuple[Context, torch.Tensor]:
    """Prefill ``blocks`` into a (new or given) paged cache; returns the context and the last row's hidden state.
    ``small_batch``: the decode step's few rows take the small-batch GEMM."""
    x, routing, blk = _embed(model, blocks)
    n = x.shape[0]
    if context is None:
        context = Context(new_cache(model, n + extra_capacity, layout), 0)
    cache = context.cache
    pos, span, next_pos = positions_and_spans(blk, context.rope_position, model.device)
    cos, sin = model._cos_sin(pos)
    # BAGEL runs QK-norm in fp32 in forwards that carry generation-expert tokens (the VAE block), else in the
    # activation dtype.
    li = LayerInputs(routing=routing, cos=cos, sin=sin, gen_mode=any(g for _, _, g in routing.segments),
                     small_batch=small_batch, kernels=model.kernels)
    h = model._run_layers(x, li, local_attention(cache.segments(), n, prefill_visible_end(span), options=model.kernels),
                          cache.write)
    cache.commit(n)
    return Context(cache, next_pos), h[-1:]
