"""The one switch: ``ParallelConfig`` -> a velocity function for ``bagel_model.denoise`` on this rank.

The latent x_t stays replicated; each step every SP rank computes its token chunk, the SP group all_gathers the
velocity rows (~1 MB at 1024²), the CFG group all_gathers branch velocities, and every rank runs the same CFG
combine and Euler update on the full tensor.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_model.denoise import VelocityFn
from bagel_model.model import BagelModel, BranchContext, GenSequence

from .cfg_parallel import assign_branches, exchange_velocities
from .mesh import Mesh, guarded
from .usp import sp_attention


def parallel_velocities(model: BagelModel, seq: GenSequence, contexts: dict[str, BranchContext], mesh: Mesh
                        ) -> VelocityFn:
    c, cfg = mesh.config, model.cfg
    if seq.split.degree != c.sp:
        raise ValueError(f"token split degree {seq.split.degree} != sequence-parallel degree {c.sp}")
    attn = {name: sp_attention(mesh, ctx.kv, seq.split.n, cfg.num_heads, cfg.num_kv_heads, options=model.kernels)
            for name, ctx in contexts.items()}
    n_lat, dim = seq.n_latent, cfg.patch_latent_dim

    def fn(x: torch.Tensor, t: float, active: tuple[str, ...]) -> dict[str, torch.Tensor]:
        mine = {}
        for b in assign_branches(active, c.cfg, mesh.cfg_idx):
            rows = model.gen_velocity_rows(x, t, seq, mesh.sp_rank, contexts[b].rope_position, attn[b])
            if c.sp > 1:
                parts = [torch.empty_like(rows) for _ in range(c.sp)]
                guarded("sp all_gather velocity rows", dist.all_gather, parts, rows.contiguous(), group=mesh.sp_group)
                rows = torch.cat(parts)
            mine[b] = rows[1:n_lat + 1]
        return exchange_velocities(mine, active, c.cfg, mesh.cfg_group, (n_lat, dim), x.device)

    return fn
