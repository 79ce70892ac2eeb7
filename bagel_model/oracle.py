"""The per-branch oracle: the denoiser as first written — one forward per CFG branch, the branch's rows laid out as
``[<vision_start>, latents..., <vision_end>, padding]`` — kept only to check the packed step against.

``PerBranchStep`` is a step engine for ``engine.denoise.denoise`` that runs every job of a step on its own through
``branch_velocity``; the packed step (``engine.step.PackedStep``) must give its bits exactly (docs/DESIGN.md §8). The
tests and the sweep's ``single-per-branch`` row use it; no production module imports it
(``tests/test_import_layers.py`` checks that).
"""
from __future__ import annotations

import torch

from bagel_kernels import ExpertSegments, invariant_linear, token_alignment

from .core.layers import LayerInputs, local_attention
from .core.model import BagelModel
from .engine.kv_cache import Context
from .engine.step import GenJob, check_jobs
from .engine.token_split import TokenSplit


def branch_routing(n_latent: int, padded: int) -> ExpertSegments:
    """Markers use the understanding expert; latents (and the tail padding) the generation expert."""
    whole = ((0, 1, False), (1, n_latent + 1, True), (n_latent + 1, n_latent + 2, False), (n_latent + 2, padded, True))
    return ExpertSegments(tuple(s for s in whole if s[0] < s[1]))


@torch.no_grad()
def branch_velocity(model: BagelModel, x_t: torch.Tensor, t: float, grid: tuple[int, int], context: Context,
                    align: int) -> torch.Tensor:
    """Velocity (n_latent, patch_dim) fp32 of one CFG branch at timestep ``t``: markers from embed_tokens, latents =
    vae2llm(x) + time_emb(t) + pos_emb, zero rows up to a multiple of ``align``, every row at the context's RoPE
    position, attending the context and the branch's own rows."""
    dev, dt = model.device, model.dtype
    n = grid[0] * grid[1]
    split = TokenSplit(n + 2, 1, align)
    emb = model.language_model.model.embed_tokens
    temb = model.time_embedder(torch.full((1,), t, dtype=torch.float32, device=dev), options=model.kernels)
    pos = model.latent_pos_embed(model._latent_pos_ids_for(grid)).to(dt)
    lat = invariant_linear(x_t.to(dt), model.vae2llm.weight, model.vae2llm.bias, options=model.kernels)
    parts = [emb(model._marker_ids[0:1]), lat + temb + pos, emb(model._marker_ids[1:2])]
    if split.padded > n + 2:
        parts.append(torch.zeros(split.padded - n - 2, model.cfg.hidden_size, dtype=dt, device=dev))
    cos, sin = model._cos_sin(torch.full((split.padded,), context.rope_position, dtype=torch.long, device=dev))
    li = LayerInputs(routing=branch_routing(n, split.padded), cos=cos, sin=sin, gen_mode=True, kernels=model.kernels)
    h = model._run_layers(torch.cat(parts), li, local_attention(context.kv, split.n, options=model.kernels))
    rows = invariant_linear(h, model.llm2vae.weight, model.llm2vae.bias, options=model.kernels).float()
    return rows[1:n + 1]


class PerBranchStep:
    """A step engine that runs each job alone through ``branch_velocity`` (no packing, no graphs)."""

    def __init__(self, model: BagelModel, align: int | None = None):
        self.model = model
        self.align = align if align is not None else token_alignment(model.device, model.kernels)
        self.jobs_run = 0

    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> list[torch.Tensor]:
        check_jobs(jobs, xs, ts)
        self.jobs_run += len(jobs)
        return [branch_velocity(self.model, x, t, j.grid, j.context, self.align) for j, x, t in zip(jobs, xs, ts)]
