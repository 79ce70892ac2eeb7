"""CFG-parallel: CFG branches on different ranks; one all_gather of the velocities per CFG step, then every rank
combines and updates its own latent (the combine is deterministic): zero broadcasts inside the loop.
Steps outside the CFG interval need only the full branch: every rank computes it, no communication."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .mesh import guarded


def assign_branches(active: tuple[str, ...], cfg_degree: int, cfg_idx: int) -> list[str]:
    """Branch i of the active list runs on cfg rank i % degree; with one branch every rank runs it."""
    if len(active) == 1:
        return list(active)
    return [b for i, b in enumerate(active) if i % cfg_degree == cfg_idx]


def exchange_velocities(mine: dict[str, torch.Tensor], active: tuple[str, ...], cfg_degree: int, group,
                        shape: tuple[int, ...], device) -> dict[str, torch.Tensor]:
    """All-gather each cfg rank's branch velocities (a rank may hold none, e.g. 2 branches on 3 ranks)."""
    if len(active) == 1 or cfg_degree == 1:
        return mine
    per = -(-len(active) // cfg_degree)
    buf = torch.zeros((per,) + tuple(shape), dtype=torch.float32, device=device)
    for j, name in enumerate(mine):
        buf[j] = mine[name]
    gathered = [torch.empty_like(buf) for _ in range(cfg_degree)]
    guarded("cfg all_gather velocities", dist.all_gather, gathered, buf, group=group)
    out = {}
    for r in range(cfg_degree):
        for j, name in enumerate(assign_branches(active, cfg_degree, r)):
            out[name] = gathered[r][j]
    return out
