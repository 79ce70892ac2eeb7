"""Step caching: skip the middle decoder layers of a denoise job on steps where their output barely changes.

A forward's layers split into ``front`` (the first Fn, always run), ``middle`` (skippable) and ``back`` (the last
Bn, always run). On a step a job computes, the middle layers run and their residual ``R = h_out - h_in`` is kept;
on a step it reuses, ``h_out = h_in + R`` (or a Taylor extrapolation of R), and the back layers run on that.
Policies (``CacheConfig.policy``):

- ``fixed``: known ahead — compute the first ``warmup`` and last ``tail`` steps of the request and every
  ``interval``-th step between them;
- ``dbcache`` (cache-dit's Dual Block Cache): compute the first ``warmup`` steps; then compare the front layers'
  residual with the one of the job's last computed step, ``mean|r - r_prev| / mean|r_prev|``, and reuse below
  ``threshold``, at most ``max_cached_run`` steps in a row;
- ``taylor_order`` 1 or 2 on top of either (TaylorSeer): the reused residual is extrapolated from finite
  differences over the job's computed steps, in step units.

Each CFG job (a request's branch with its own context) decides alone, on its own numbers: every quantity is made
from the job's own rows, in one canonical order, as one contiguous tensor of the same shape however the step is
packed or split — so a job's decision and its bits are the same alone, in a batch and under every parallel
configuration (docs/DESIGN.md §3, §8).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.sampling import CacheConfig

@dataclass
class JobCache:
    """One job's cache state across steps (host counters; device residuals in the job's canonical row order)."""

    last: int = -1  # the request step the middle layers last ran at
    run: int = 0  # reused steps in a row
    computed: int = 0  # middle-layer steps computed
    reused: int = 0  # middle-layer steps reused
    front: torch.Tensor | None = None  # dbcache: the front layers' residual at the last computed step
    terms: list[torch.Tensor] = field(default_factory=list)  # the middle residual and its derivatives (fp32)


@dataclass
class JobStep:
    """What the step engine needs to know of a job's request this step: its step index, its step count, its cache
    settings and its cache state."""

    step: int
    steps: int  # model evaluations of the request (timesteps - 1)
    config: CacheConfig
    state: JobCache


def forced(js: JobStep) -> bool | None:
    """True: the middle layers must run; False: they must not (fixed); None: dbcache decides from the numbers."""
    c, s = js.config, js.state
    if not c.enabled or js.step < c.warmup or not s.terms:
        return True
    if c.policy == "fixed":
        return js.step >= js.steps - c.tail or (js.step - c.warmup) % c.interval == 0
    return True if s.run >= c.max_cached_run else None


def relative_l1(r: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """``mean|r - prev| / mean|prev|`` of one job's rows (a 0-d fp32 device tensor): the same op on a tensor of the
    same shape everywhere, so the same bits."""
    return (r.float() - prev.float()).abs().mean() / prev.float().abs().mean()


def predicted(js: JobStep) -> torch.Tensor:
    """The middle residual a reused step adds: the last one, or its Taylor extrapolation to this step (fp32)."""
    terms, x = js.state.terms, float(js.step - js.state.last)
    out = terms[0]
    if len(terms) > 1:
        out = out + terms[1] * x
    if len(terms) > 2:
        out = out + terms[2] * (x * x / 2.0)
    return out


def record(js: JobStep, residual: torch.Tensor) -> None:
    """A computed step's middle residual: the new Taylor terms (finite differences over the computed steps)."""
    s, order = js.state, js.config.taylor_order
    r = residual.float()
    terms = [r]
    if order and s.terms and s.last >= 0:
        window = float(js.step - s.last)
        for i in range(order):
            if i >= len(s.terms):
                break
            terms.append((terms[i] - s.terms[i]) / window)
    s.terms, s.last, s.run = terms, js.step, 0
    s.computed += 1


def reuse(js: JobStep) -> None:
    js.state.run += 1
    js.state.reused += 1
