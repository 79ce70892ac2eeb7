"""Flow-matching Euler denoising with three-branch CFG; timesteps are host floats (no device reads in the loop)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, asdict
from typing import Callable

import torch
from tqdm.auto import tqdm

from .cfg import RENORM_TYPES, combine_cfg
from .step import GenJob
from .finite_guard import FiniteGuard

BRANCHES = ("full", "text", "img")  # full context / without text (cfg_text) / without image (cfg_img)


@dataclass
class SamplingParams:
    """Every request parameter of a generation; all of them travel between pipeline stages."""

    steps: int = 50
    seed: int = 0
    height: int = 1024
    width: int = 1024
    timestep_shift: float = 3.0
    cfg_text_scale: float = 4.0
    cfg_img_scale: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    cfg_renorm_min: float = 0.0
    cfg_renorm_type: str = "global"

    def validate(self) -> "SamplingParams":
        for name in ("timestep_shift", "cfg_text_scale", "cfg_img_scale", "cfg_renorm_min"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if not (isinstance(self.cfg_interval, (tuple, list)) and len(self.cfg_interval) == 2
                and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in self.cfg_interval)):
            raise ValueError(f"cfg_interval must be two finite numbers (lo, hi), got {self.cfg_interval!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {self.seed!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"steps must be an integer >= 2 (the schedule has steps-1 Euler updates), got {self.steps!r}")
        if self.cfg_renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg_renorm_type must be one of {RENORM_TYPES}, got {self.cfg_renorm_type!r}")
        lo, hi = self.cfg_interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"cfg_interval must satisfy 0 <= lo <= hi <= 1, got {self.cfg_interval}")
        if self.timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {self.timestep_shift}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cfg_interval"] = list(self.cfg_interval)
        return d

    @staticmethod
    def from_dict(d: dict) -> "SamplingParams":
        """Strict: every field must be present and none unknown — a parameter dropped between pipeline stages must
        be an error, never a silent default (seed 000: the diffusion stage ran 50 steps instead of the request's)."""
        from dataclasses import fields

        names = {f.name for f in fields(SamplingParams)}
        missing, unknown = sorted(names - set(d)), sorted(set(d) - names)
        if missing or unknown:
            raise ValueError(f"sampling parameters incomplete: missing {missing}, unknown {unknown}")
        d = dict(d)
        d["cfg_interval"] = tuple(d["cfg_interval"])
        return SamplingParams(**d).validate()


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


VelocityFn = Callable[[torch.Tensor, float, tuple[str, ...]], dict[str, torch.Tensor]]


def initial_noise(n_tokens: int, dim: int, seed: int) -> torch.Tensor:
    """N(0, I) drawn directly in packed-token space on the CPU generator (device-independent), fp32."""
    return torch.randn(n_tokens, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def denoise(x: torch.Tensor, p: SamplingParams, velocities: VelocityFn, progress: bool = True,
            on_step: Callable[[int, float], None] | None = None,
            schedule: tuple[list[float], list[float]] | None = None, guard: FiniteGuard | None = None
            ) -> torch.Tensor:
    """Euler integration x <- x - v * dt with CFG; x stays fp32. ``velocities`` returns one tensor per branch.

    The schedule is read to host floats once, before the loop (pass it in to keep even that out of a guarded region).
    A non-finite latent raises ``NonFiniteLatentError`` naming the first bad step, after the loop (one host read);
    pass your own ``guard`` to take that read out of here (then call ``guard.check()`` yourself).
    """
    own_guard = guard is None
    guard = guard or FiniteGuard()
    ts, dts = schedule if schedule is not None else timestep_schedule(p.steps, p.timestep_shift)
    for i in tqdm(range(len(ts)), desc="denoise", disable=not progress, leave=False):
        t = ts[i]
        active = branches_at(t, p)
        vs = velocities(x, t, active)
        text_scale = p.cfg_text_scale if len(active) > 1 else 1.0
        img_scale = p.cfg_img_scale if len(active) > 2 else 1.0
        v = combine_cfg(vs["full"], vs.get("text"), vs.get("img"), text_scale=text_scale, img_scale=img_scale,
                        renorm_min=p.cfg_renorm_min, renorm_type=p.cfg_renorm_type)
        x = x - v.float() * dts[i]
        guard.step(x, i)  # device-side flag, no host read
        if on_step is not None:
            on_step(i, t)
    if own_guard:
        guard.check(len(ts))
    return x


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


def denoise_batch(requests: list[DenoiseRequest], engine, progress: bool = True,
                  on_step: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None,
                  guards: list[FiniteGuard] | None = None) -> list[torch.Tensor]:
    """Euler integration of several requests at once: at every step each request still running contributes its
    distinct CFG jobs, and ``engine`` (``denoise_step.PackedStep`` or ``parallel.denoise.ParallelStep``) runs all
    jobs of the step in one packed forward. Requests may differ in size, step count and CFG settings; each one's
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
        jobs, job_x, job_t, plan = [], [], [], []
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
                where[b] = idx
            plan.append((i, active, where))
        vels = engine(jobs, job_x, job_t)
        for i, active, where in plan:
            p, dt = requests[i].params, scheds[i][1][k]
            vs = {b: vels[where[b]] for b in active}
            text_scale = p.cfg_text_scale if len(active) > 1 else 1.0
            img_scale = p.cfg_img_scale if len(active) > 2 else 1.0
            v = combine_cfg(vs["full"], vs.get("text"), vs.get("img"), text_scale=text_scale, img_scale=img_scale,
                            renorm_min=p.cfg_renorm_min, renorm_type=p.cfg_renorm_type)
            xs[i] = xs[i] - v.float() * dt
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
