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

from bagel_model.engine.cache import JobStep
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

    captures_collectives = True  # its CUDA graphs hold NCCL collectives: capture after a device synchronize

    def __init__(self, model: BagelModel, mesh: Mesh, align: int, use_graph: bool | None = None):
        super().__init__(model, align, mesh.config.sp, use_graph)
        self.mesh = mesh
        self._solo: ParallelStep | None = None

    def _attention(self, layout: PackedLayout, ctx: PackedContext):
        m = self.model
        return sp_attention(self.mesh, layout, ctx, m.cfg.num_heads, m.cfg.num_kv_heads, options=m.kernels)

    def _rank(self) -> int:
        return self.mesh.sp_rank

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        sp = self.mesh.config.sp
        if sp == 1:
            return rows
        parts = [torch.empty_like(rows) for _ in range(sp)]
        guarded("sp all_gather hidden rows (step cache)", dist.all_gather, parts, rows.contiguous(),
                group=self.mesh.sp_group)
        return torch.cat(parts)

    def _run_group(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float],
                   plan: list[JobStep] | None = None) -> list[torch.Tensor]:
        mesh, sp = self.mesh, self.mesh.config.sp
        if plan is not None and any(js.config.enabled for js in plan):
            self.forwards += 1
            self.jobs_run += len(jobs)
            rows, layout = self._cached_rows(jobs, xs, ts, plan)
            return split_rows(self._gather(rows), layout)
        e = self._entry(jobs)

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

    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float],
                 plan: list[JobStep] | None = None) -> list[torch.Tensor]:
        """``plan``: each job's step-cache entry (``bagel_model.engine.cache``), when a request caches. Every rank
        keeps every job's cache state: a job's state moves with it between CFG ranks and onto ``Mesh.solo``."""
        check_jobs(jobs, xs, ts)
        mesh, cdeg = self.mesh, self.mesh.config.cfg
        if len(jobs) == 1 and mesh.solo is not None:
            if self._solo is None:
                self._solo = ParallelStep(self.model, mesh.solo, self.align, self.graphs.enabled)
                self._solo.graphs = self.graphs  # one graph pool: the two engines' graphs never run at once
            self.forwards += 1
            self.jobs_run += 1
            return self._solo(jobs, xs, ts, plan)
        cache_plan, plan = plan, assign_jobs(len(jobs), cdeg)
        mine = plan[mesh.cfg_idx]
        got = self._run_group([jobs[i] for i in mine], [xs[i] for i in mine], [ts[i] for i in mine],
                              [cache_plan[i] for i in mine] if cache_plan is not None else None) if mine else []
        if plan[0] is plan[-1] and len(plan[0]) == len(jobs):  # every rank ran every job
            return got
        if cache_plan is not None and any(js.config.enabled for js in cache_plan):
            share_cache_states(cache_plan, plan, mesh, jobs, self.model)
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


def share_cache_states(cache_plan: list[JobStep], plan: list[list[int]], mesh: Mesh, jobs: list[GenJob], model) -> None:
    """After a step whose jobs were split over the CFG ranks: every rank learns every job's new step-cache state
    from the CFG rank that ran it (two all_gathers over the CFG group: what each job did, then the tensors of the
    jobs that ran their middle layers), so the state is where the job runs next."""
    cdeg, me = mesh.config.cfg, mesh.cfg_idx
    dev = model.device
    # 1. what each job did this step: its counters and Taylor-term count after the step (host numbers)
    mine = torch.zeros(len(jobs), 5, dtype=torch.float64, device=dev)
    for i in plan[me]:
        s = cache_plan[i].state
        mine[i] = torch.tensor([s.last, s.run, s.computed, s.reused, len(s.terms)], dtype=torch.float64)
    parts = [torch.empty_like(mine) for _ in range(cdeg)]
    guarded("cfg all_gather step-cache counters", dist.all_gather, parts, mine, group=mesh.cfg_group)
    counters = [p.tolist() for p in parts]  # one host read per step
    owner = {i: r for r, p in enumerate(plan) for i in p}
    fresh, n_terms = [], {}  # jobs that ran their middle layers: their tensors travel
    for i, js in enumerate(cache_plan):
        last, run, computed, reused, n_terms[i] = (int(v) for v in counters[owner[i]][i])
        if js.config.enabled and last == js.step:  # its middle layers ran this step (the owner's counters say)
            fresh.append(i)
        if owner[i] != me:
            js.state.last, js.state.run, js.state.computed, js.state.reused = last, run, computed, reused
    if not fresh:
        return
    # 2. the fresh jobs' tensors: Taylor terms, and dbcache's front residual, flattened in fp32 per owner
    def tensors(i: int) -> list[torch.Tensor]:
        s = cache_plan[i].state
        return list(s.terms) + ([s.front] if cache_plan[i].config.policy == "dbcache" else [])

    def shapes(i: int) -> list[tuple[int, int]]:  # the job's rows (latents + 2 markers) x hidden, per tensor
        n = jobs[i].grid[0] * jobs[i].grid[1] + 2
        return [(n, model.cfg.hidden_size)] * (n_terms[i] + (cache_plan[i].config.policy == "dbcache"))

    sizes = [sum(a * b for i in fresh if owner[i] == r for a, b in shapes(i)) for r in range(cdeg)]
    buf = torch.zeros(max(sizes), dtype=torch.float32, device=dev)
    o = 0
    for i in fresh:
        if owner[i] == me:
            for t in tensors(i):
                buf[o:o + t.numel()] = t.reshape(-1).float()
                o += t.numel()
    gathered = [torch.empty_like(buf) for _ in range(cdeg)]
    guarded("cfg all_gather step-cache tensors", dist.all_gather, gathered, buf, group=mesh.cfg_group)
    offset = [0] * cdeg
    for i in fresh:
        r = owner[i]
        if r == me:
            continue
        got = []
        for a, b in shapes(i):
            got.append(gathered[r][offset[r]:offset[r] + a * b].view(a, b))
            offset[r] += a * b
        s = cache_plan[i].state
        if cache_plan[i].config.policy == "dbcache":
            s.front = got.pop().to(model.dtype)
        s.terms = [t.clone() for t in got]
