"""Flow-matching Euler denoising with three-branch CFG; timesteps are host floats (no device reads in the loop)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..core.sampling import SamplingParams
from .cache import JobCache, JobStep
from .cfg import cfg_update
from .step import GenJob
from .finite_guard import FiniteGuard

BRANCHES = ("full", "text", "img")  # full context / without text (cfg_text) / without image (cfg_img)


def timestep_schedule(steps: int, shift: float) -> tuple[list[float], list[float]]:
    """Shifted t = s*t/(1+(s-1)*t) over linspace(1, 0, steps), computed in fp32 like BAGEL; returns (t_i, dt_i)."""
    t = torch.linspace(1, 0, steps, dtype=torch.float32)
    t = shift * t / (1 + (shift - 1) * t)
    dts = t[:-1] - t[1:]
    return t[:-1].tolist(), dts.tolist()


def branches_at(t: float, p: SamplingParams) -> tuple[str, ...]:
    """Branches to evaluate at time t: CFG only when lo < t <= hi (on the shifted t), and only those with scale > 1."""
    lo, hi = p.cfg_interval
    if not (lo < t <= hi) or p.cfg_text_scale <= 1.0:
        return ("full",)
    return ("full", "text", "img") if p.cfg_img_scale > 1.0 else ("full", "text")


def initial_noise(n_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """N(0, I) drawn directly in packed-token space on the CPU generator (device-independent), fp32."""
    return torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


@dataclass
class DenoiseRequest:
    """One request of a batched denoise: its noise, parameters, latent grid and branch contexts.

    ``contexts`` maps every CFG branch the request may run ("full", "text", "img") to its frozen context; branches
    that share one context object are one job (text-to-image's cfg_img branch IS the full branch: same context,
    same x_t, same t, so its velocity would be the same bits — it is computed once and reused)."""

    x: torch.Tensor
    params: SamplingParams
    grid: tuple[int, int]
    contexts: dict
    schedule: tuple[list[float], list[float]] | None = None
    _jobs: dict = field(default_factory=dict, repr=False)
    _caches: dict = field(default_factory=dict, repr=False)  # per job: its step-cache state (engine.cache)

    @staticmethod
    def start(cfg, params: SamplingParams, contexts: dict, device, size: tuple[int, int] | None = None,
              schedule: tuple[list[float], list[float]] | None = None) -> "DenoiseRequest":
        """A request at its first step: the latent grid of ``size`` (default: the params' height x width) on model
        config ``cfg``, and its seeded initial noise on ``device``."""
        grid = cfg.check_image_size(*(size or (params.height, params.width)))
        x0 = initial_noise(grid[0] * grid[1], cfg.patch_latent_dim, params.seed).to(device)
        return DenoiseRequest(x0, params, grid, contexts, schedule)

    def job_for(self, branch: str):
        """The job of ``branch``: one object per distinct context, made once (its identity keys engine caches)."""
        ctx = self.contexts[branch]
        job = self._jobs.get(id(ctx))
        if job is None:
            job = self._jobs[id(ctx)] = GenJob(self.grid, ctx)
        return job

    def job_step(self, job, step: int) -> JobStep:
        """The job's step-cache plan entry at request step ``step`` (its state kept across steps)."""
        state = self._caches.setdefault(id(job), JobCache())
        return JobStep(step, self.params.steps - 1, self.params.cache, state)

    def cache_stats(self) -> dict[str, int]:
        """Middle-layer steps computed and reused over the request's jobs so far (each job counted)."""
        states = self._caches.values()
        return {"computed": sum(s.computed for s in states), "reused": sum(s.reused for s in states)}


def denoise(requests: list[DenoiseRequest], engine, progress: bool = True,
            on_step: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None,
            guards: list[FiniteGuard] | None = None) -> list[torch.Tensor]:
    """Euler integration of several requests at once: at every step each request still running contributes its
    distinct CFG jobs, and ``engine`` (``engine.step.PackedStep`` or ``parallel.denoise.ParallelStep``) runs all
    jobs of the step in one packed forward; a request whose ``params.cache`` is on hands the engine each job's
    step-cache plan too (``engine.cache``). Requests may differ in size, step count and CFG settings; each one's
    arithmetic is what ``denoise`` does for it alone (same combine, same update), so its bits are too.
    ``on_step(request_index, step, t, x)`` is called after each request's update with its new latent ``x``; a
    tensor it returns replaces that latent (same shape; fp32) — the caller's choice, which then changes the bits. Each request's latent is watched
    by a ``FiniteGuard`` (device-side, no host read in the loop) and checked once at the end, naming the first
    non-finite step; pass ``guards`` to check them yourself (e.g. outside a no-sync region)."""
    own_guards = guards is None
    guards = guards if guards is not None else [FiniteGuard() for _ in requests]
    scheds = [r.schedule if r.schedule is not None else timestep_schedule(r.params.steps, r.params.timestep_shift)
              for r in requests]
    xs = [r.x for r in requests]
    total = max(len(s[0]) for s in scheds)
    for k in tqdm(range(total), desc="denoise", disable=not progress, leave=False):
        jobs, job_x, job_t, cache_plan, plan = [], [], [], [], []
        for i, r in enumerate(requests):
            ts = scheds[i][0]
            if k >= len(ts):
                continue
            active = branches_at(ts[k], r.params)
            where = {}
            for b in active:
                job = r.job_for(b)
                idx = next((n for n, jb in enumerate(jobs) if jb is job), None)
                if idx is None:
                    idx = len(jobs)
                    jobs.append(job)
                    job_x.append(xs[i])
                    job_t.append(ts[k])
                    cache_plan.append(r.job_step(job, k))
                where[b] = idx
            plan.append((i, active, where))
        cached = any(js.config.enabled for js in cache_plan)
        vels = engine(jobs, job_x, job_t, cache_plan) if cached else engine(jobs, job_x, job_t)
        for i, active, where in plan:
            xs[i] = cfg_update(xs[i], {b: vels[where[b]] for b in active}, requests[i].params, scheds[i][1][k])
            guards[i].step(xs[i], k)
            if on_step is not None:
                new = on_step(i, k, scheds[i][0][k], xs[i])
                if new is not None:
                    if not isinstance(new, torch.Tensor) or new.shape != xs[i].shape:
                        raise ValueError(f"the step hook returned {type(new).__name__} "
                                         f"{tuple(getattr(new, 'shape', ()))}; a latent must be {tuple(xs[i].shape)}")
                    xs[i] = new.to(xs[i].device, torch.float32)
    if own_guards:
        for i, g in enumerate(guards):
            g.check(len(scheds[i][0]), what=f"latent of request {i}" if len(requests) > 1 else "latent")
    return xs
