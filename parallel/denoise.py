"""The packed step on a mesh: ``ParallelStep`` is the ``StepEngine`` of ``bagel_model.engine.denoise.denoise_batch`` for
any ``ParallelConfig``.

The jobs of a step (distinct CFG branches of every request) go round-robin to the CFG ranks; a step with one job (a
text2img step outside the CFG interval) runs on ``Mesh.solo``, where the CFG ranks join the sequence split. Each CFG
group runs its jobs as ONE packed forward split over its sequence-parallel ranks
(``bagel_model.engine.layout``: padding only at the global tail), all_gathers the velocity rows over SP (~1 MB per job at
1024²), and one all_gather over the CFG group hands every rank every job's velocity. The latents stay replicated:
every rank runs the same CFG combine and Euler update on the full tensors — no broadcast inside the loop.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from bagel_model.engine.step import GenJob, PackedStepBase, check_jobs, split_rows
from bagel_model.core.model import BagelModel
from bagel_model.engine.layout import PackedContext, PackedLayout

from .mesh import Mesh, guarded
from .usp import sp_attention


def assign_jobs(n_jobs: int, cfg_degree: int) -> list[list[int]]:
    """Job indices per CFG rank: job i on rank i % degree; a single job runs on every rank (no exchange)."""
    if n_jobs == 1 or cfg_degree == 1:
        return [list(range(n_jobs))] * cfg_degree
    return [[i for i in range(n_jobs) if i % cfg_degree == r] for r in range(cfg_degree)]


class ParallelStep(PackedStepBase):
    """Packed step over ``mesh`` (every rank of the world calls it with the same jobs, in the same order).
    ``use_graph`` (default: on CUDA) records each job layout's forward — collectives included (NCCL) — in a CUDA
    graph on its second run and replays it, as the single-device engine does."""

    def __init__(self, model: BagelModel, mesh: Mesh, align: int, use_graph: bool | None = None):
        super().__init__(model, align, mesh.config.sp, use_graph)
        self.mesh = mesh
        self._solo: ParallelStep | None = None

    def _attention(self, layout: PackedLayout, ctx: PackedContext):
        m = self.model
        return sp_attention(self.mesh, layout, ctx, m.cfg.num_heads, m.cfg.num_kv_heads, options=m.kernels)

    def _run_group(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> list[torch.Tensor]:
        e = self._entry(jobs)
        mesh, sp = self.mesh, self.mesh.config.sp

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            rows = self.model.packed_velocity_rows(x, t, e.layout, e.ropes, mesh.sp_rank, e.attention, e.cache)
            if sp > 1:
                parts = [torch.empty_like(rows) for _ in range(sp)]
                guarded("sp all_gather velocity rows", dist.all_gather, parts, rows.contiguous(), group=mesh.sp_group)
                rows = torch.cat(parts)
            return rows

        self.forwards += 1
        self.jobs_run += len(jobs)
        return split_rows(self.graphs.run(e, forward, xs, ts, self.model.device), e.layout)

    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> list[torch.Tensor]:
        check_jobs(jobs, xs, ts)
        mesh, cdeg = self.mesh, self.mesh.config.cfg
        if len(jobs) == 1 and mesh.solo is not None:
            if self._solo is None:
                self._solo = ParallelStep(self.model, mesh.solo, self.align, self.graphs.enabled)
                self._solo.graphs = self.graphs  # one graph pool: the two engines' graphs never run at once
            self.forwards += 1
            self.jobs_run += 1
            return self._solo(jobs, xs, ts)
        plan = assign_jobs(len(jobs), cdeg)
        mine = plan[mesh.cfg_idx]
        got = self._run_group([jobs[i] for i in mine], [xs[i] for i in mine], [ts[i] for i in mine]) if mine else []
        if plan[0] is plan[-1] and len(plan[0]) == len(jobs):  # every rank ran every job
            return got
        # one all_gather over the CFG group; each rank's jobs flattened, padded to the longest rank's rows
        rows_of = [sum(jobs[i].grid[0] * jobs[i].grid[1] for i in p) for p in plan]
        dim = xs[0].shape[1]
        buf = torch.zeros(max(rows_of), dim, dtype=torch.float32, device=xs[0].device)
        if got:
            torch.cat(got, out=buf[:rows_of[mesh.cfg_idx]])
        gathered = [torch.empty_like(buf) for _ in range(cdeg)]
        guarded("cfg all_gather velocities", dist.all_gather, gathered, buf, group=mesh.cfg_group)
        out: list = [None] * len(jobs)
        for r, p in enumerate(plan):
            o = 0
            for i in p:
                n = jobs[i].grid[0] * jobs[i].grid[1]
                out[i] = gathered[r][o:o + n]
                o += n
        return out
