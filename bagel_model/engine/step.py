"""The denoiser's step engine: the jobs of one step — (request, CFG branch) pairs — in one packed forward.

``PackedStep`` is the single-device engine: it lays the jobs out with ``packed.PackedLayout`` and, on CUDA, records
the forward of each job layout in a CUDA graph the second time that layout occurs (the first run is eager: it
compiles every kernel) and replays it afterwards, the per-step inputs (latents, timesteps) copied into the graph's
static buffers. The graph runs the very kernels of the eager forward on the same numbers, so replay == eager bit for
bit. ``parallel.denoise.ParallelStep`` is the same engine spread over a mesh.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from bagel_kernels import token_alignment

from ..core.model import BagelModel
from ..runtime.graph_capture import capture
from . import cache
from .cache import JobStep
from .kv_cache import Context
from .layout import PackedAttention, PackedContext, PackedLayout, device_values, packed_context


@dataclass(frozen=True, eq=False)
class GenJob:
    """One branch-forward: a latent grid attending one frozen context. Made once per (request, distinct context):
    the engine copies a layout's contexts into its own buffers when the context objects change."""

    grid: tuple[int, int]
    context: Context


class StepEngine(Protocol):
    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> list[torch.Tensor]:
        """Velocity (n_latent, patch_dim) fp32 of every job, given its latent x_t and its timestep t."""
        ...


@dataclass
class StepEntry:
    """Everything one job layout needs, built on its first step and kept while the layout recurs -- across
    requests too: ``ctx`` holds the jobs' contexts in the entry's own buffers (what the attention and a captured
    graph read), refilled in place when jobs of the same shapes but other contexts arrive."""

    jobs: list[GenJob]  # the jobs whose contexts ``ctx`` holds (held: their ids stay theirs)
    layout: PackedLayout
    ropes: tuple[int, ...]
    ctx: PackedContext
    attention: object
    cache: dict = field(default_factory=dict)
    runs: int = 0
    graph: object = None
    x_static: torch.Tensor | None = None
    t_static: torch.Tensor | None = None
    out_static: torch.Tensor | None = None


def layout_key(jobs: list[GenJob]) -> tuple:
    """What a layout's forward depends on besides its inputs and its contexts' values: the jobs' grids, context
    lengths and RoPE positions (their order included)."""
    return tuple((j.grid, j.context.length, j.context.rope_position) for j in jobs)


def _owners(jobs: list[GenJob]) -> tuple[int, ...]:
    return tuple(id(j.context) for j in jobs)


def split_rows(rows: torch.Tensor, layout: PackedLayout) -> list[torch.Tensor]:
    """Per-job latent velocities from the packed output rows (latent rows come first, job after job)."""
    return [rows[o:o + n] for o, n in zip(layout.latent_offset, layout.n_latent)]


class GraphedForwards:
    """Runs a packed forward per job layout: eagerly on its first run (compiles, warms the allocator), then — when
    ``enabled`` — recorded once into a CUDA graph and replayed, the step's latents and timesteps copied into the
    graph's static inputs. All graphs share one memory pool (they never run at the same time). Used by both
    engines; the parallel one records its collectives (NCCL) in the graph too."""

    def __init__(self, enabled: bool, synchronize: bool = False):
        self.enabled, self.synchronize = enabled, synchronize  # synchronize: see runtime.graph_capture.capture
        self._pool = None
        self._stream = None  # the side stream captures run on (runtime.graph_capture.capture)

    def run(self, e: StepEntry, forward, xs: list[torch.Tensor], ts: list[float], device) -> torch.Tensor:
        """``forward(x_packed, t_jobs)`` -> output rows. Returns the rows (a static buffer when replayed)."""
        if not self.enabled or e.runs == 0:
            e.runs += 1
            return forward(torch.cat(xs) if len(xs) > 1 else xs[0], device_values(ts, device, torch.float32))
        if e.graph is None:
            e.x_static = torch.empty(e.layout.latent_rows, xs[0].shape[1], dtype=torch.float32, device=device)
            e.t_static = torch.zeros(len(ts), dtype=torch.float32, device=device)
            self._copy_in(e, xs, ts)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=device)
            graph = torch.cuda.CUDAGraph()
            e.out_static = capture(graph, lambda: forward(e.x_static, e.t_static), self._pool, self._stream,
                                   self.synchronize)
            e.graph = graph
        else:
            self._copy_in(e, xs, ts)
        e.graph.replay()
        e.runs += 1
        return e.out_static

    @staticmethod
    def _copy_in(e: StepEntry, xs: list[torch.Tensor], ts: list[float]) -> None:
        for o, n, x in zip(e.layout.latent_offset, e.layout.n_latent, xs):
            e.x_static[o:o + n].copy_(x)
        for i, t in enumerate(ts):
            e.t_static[i:i + 1].fill_(t)


def check_jobs(jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> None:
    if not (len(jobs) == len(xs) == len(ts)):
        raise ValueError(f"{len(jobs)} jobs, {len(xs)} latents, {len(ts)} timesteps: one of each per job")
    for j, x in zip(jobs, xs):
        if x.shape[0] != j.grid[0] * j.grid[1]:
            raise ValueError(f"latent of {x.shape[0]} tokens for a {j.grid[0]}x{j.grid[1]} grid")


def _job_rows(layout: PackedLayout, cache: dict, device) -> list[torch.Tensor]:
    """Per job, its rows of the whole padded layout in canonical order (latents, then its two markers)."""
    if "job_rows" not in cache:
        cache["job_rows"] = [torch.cat([torch.arange(o, o + n, device=device),
                                        torch.arange(layout.marker_rows(j)[0], layout.marker_rows(j)[0] + 2,
                                                     device=device)])
                             for j, (o, n) in enumerate(zip(layout.latent_offset, layout.n_latent))]
    return cache["job_rows"]


def _subset_rows(whole: PackedLayout, sub: PackedLayout, active: list[int], cache: dict, device
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the ``active`` jobs in the whole layout (``src``) and in their own packed layout (``dst``)."""
    key = ("subset", tuple(active))
    if key not in cache:
        src = torch.cat([_job_rows(whole, cache, device)[j] for j in active])
        dst = torch.cat(_job_rows(sub, {}, device))
        cache[key] = (src, dst)
    return cache[key]


class PackedStepBase:
    """What both step engines share: a job layout's entry (layout, packed contexts, attention, caches), made on its
    first step and kept while it recurs, and the graph runner. ``degree``: the sequence-parallel split of a
    forward; subclasses give the attention that suits it."""

    captures_collectives = False  # a subclass whose forward runs collectives (NCCL) sets it: see GraphedForwards

    def __init__(self, model: BagelModel, align: int, degree: int, use_graph: bool | None = None,
                 max_layouts: int = 4):
        if max_layouts < 1:
            raise ValueError(f"max_layouts must be >= 1, got {max_layouts}")
        self.model, self.align, self.degree, self.max_layouts = model, align, degree, max_layouts
        use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        if use_graph and model.device.type != "cuda":
            raise ValueError("CUDA-graph replay needs a CUDA model")
        self.graphs = GraphedForwards(use_graph, synchronize=self.captures_collectives)
        self._entries: dict[tuple, StepEntry] = {}
        self.forwards = 0  # packed forwards run (eager or replayed)
        self.jobs_run = 0  # branch-forwards they contained
        self.refills = 0  # layouts reused with other contexts copied in (a later request of the same shapes)

    @property
    def use_graph(self) -> bool:
        return self.graphs.enabled

    def _attention(self, layout: PackedLayout, ctx: PackedContext):
        raise NotImplementedError

    def _entry(self, jobs: list[GenJob]) -> StepEntry:
        key = layout_key(jobs)
        e = self._entries.pop(key, None)
        if e is None:
            while len(self._entries) >= self.max_layouts:  # a long-lived engine keeps the latest layouts only
                self._entries.pop(next(iter(self._entries)))
            layout = PackedLayout(tuple(j.grid for j in jobs), self.degree, self.align)
            ctx = self._packed(jobs)
            e = StepEntry(list(jobs), layout, tuple(j.context.rope_position for j in jobs), ctx,
                          self._attention(layout, ctx))
        elif _owners(e.jobs) != _owners(jobs):
            # Same shapes, other contexts (the next request): copy them into the entry's buffers, so its caches and
            # its CUDA graph serve again. The forward then reads these values, so its bits are a fresh entry's.
            new = self._packed(jobs)
            for mine, theirs in zip(e.ctx.layers, new.layers):
                if mine is not None:
                    mine[0].copy_(theirs[0])
                    mine[1].copy_(theirs[1])
            e.jobs = list(jobs)
            self.refills += 1
        self._entries[key] = e  # most recently used last
        return e

    def _packed(self, jobs: list[GenJob]) -> PackedContext:
        return packed_context([j.context.kv for j in jobs], [j.context.length for j in jobs],
                              self.model.cfg.num_layers)

    def reset(self) -> None:
        """Drop every cached layout (and its graph); call between unrelated batches to free memory."""
        self._entries.clear()

    # ---- step caching (engine.cache): a forward in layer ranges, jobs leaving and rejoining -------------------
    def _rank(self) -> int:
        """This process's rank in the sequence-parallel split of a forward."""
        return 0

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of a split forward, in order (the whole padded layout); one device: the rows."""
        return rows

    def _cached_rows(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float],
                     plan: list[JobStep]) -> tuple[torch.Tensor, PackedLayout]:
        """This rank's velocity rows (and the step's layout) of a step in which jobs may reuse their middle layers.
        The layers run in ranges between the jobs' front/back boundaries; each range runs the jobs active in it — all of them in the step's
        layout, or the subset in a packed layout of its own (batch invariance: their rows get the bits they get in
        any pack). Per-job quantities (statistic, residual) are made from the job's own rows of the whole layout,
        so they are the same on every rank and in every configuration. Runs eagerly (no CUDA graph)."""
        m, n_layers = self.model, self.model.cfg.num_layers
        for js in plan:
            js.config.validate(num_layers=n_layers)
        e = self._entry(jobs)
        lay, rank = e.layout, self._rank()
        x0, li = m.packed_inputs(torch.cat(xs) if len(xs) > 1 else xs[0], device_values(ts, m.device, torch.float32),
                                 lay, e.ropes, rank, e.cache)
        idx = _job_rows(lay, e.cache, m.device)
        h = self._gather(x0)
        x0_full = h
        # a job's middle is [front, n - back) when it runs them, else it sits out those layers
        decided = {j: cache.forced(js) for j, js in enumerate(plan)}
        lo = {j: js.config.front if js.config.enabled else n_layers for j, js in enumerate(plan)}
        hi = {j: n_layers - js.config.back if js.config.enabled else n_layers for j, js in enumerate(plan)}
        h_in: dict[int, torch.Tensor] = {}
        bounds = sorted({0, n_layers} | set(lo.values()) | set(hi.values()))
        for b0, b1 in zip(bounds, bounds[1:]):
            starting = [j for j in lo if lo[j] == b0]
            # dbcache: the front layers' residual, compared with the last computed step's and kept when computing
            fronts = {j: h[idx[j]] - x0_full[idx[j]] for j in starting if plan[j].config.policy == "dbcache"}
            pending = [j for j in starting if decided[j] is None]
            if pending:  # one host read for every job deciding here
                stats = torch.stack([cache.relative_l1(fronts[j], plan[j].state.front) for j in pending]).tolist()
                for j, stat in zip(pending, stats):
                    decided[j] = not stat < plan[j].config.threshold  # a NaN statistic computes
            for j in starting:
                if decided[j]:
                    if j in fronts:
                        plan[j].state.front = fronts[j]
                    h_in[j] = h[idx[j]]
            ending = [j for j in hi if hi[j] == b0 and lo[j] < b0]
            h = self._rejoin(h, ending, plan, decided, h_in, idx)
            active = [j for j in range(len(jobs)) if decided[j] or not lo[j] <= b0 < hi[j]]
            h = self._run_range(e, li, h, [jobs[j] for j in active], active, b0, b1)
        ending = [j for j in hi if hi[j] == n_layers and lo[j] < n_layers]
        h = self._rejoin(h, ending, plan, decided, h_in, idx)
        r0, r1 = lay.split.rows(rank)
        return m.velocity_head(h[r0:r1], li), lay

    def _rejoin(self, h, ending, plan, decided, h_in, idx):
        """Jobs whose middle ends here: a computed one records its residual, a reused one adds it back."""
        if any(not decided[j] for j in ending):
            h = h.clone()  # ``h`` may still be another range's input
        for j in ending:
            if decided[j]:
                cache.record(plan[j], h[idx[j]] - h_in.pop(j))
            else:
                h[idx[j]] = (h[idx[j]].float() + cache.predicted(plan[j])).to(h.dtype)
                cache.reuse(plan[j])
        return h

    def _run_range(self, e: StepEntry, li, h: torch.Tensor, jobs: list[GenJob], active: list[int], b0: int,
                   b1: int) -> torch.Tensor:
        """Layers [b0, b1) for the ``active`` jobs of entry ``e`` on the whole-layout hidden rows ``h``."""
        m, rank = self.model, self._rank()
        if not active or b0 == b1:
            return h
        if len(active) == e.layout.num_jobs:
            r0, r1 = e.layout.split.rows(rank)
            return self._gather(m.run_layers(h[r0:r1], li, e.attention, b0, b1))
        sub = self._entry(jobs)  # the active jobs packed on their own
        src, dst = _subset_rows(e.layout, sub.layout, active, e.cache, m.device)
        x = torch.zeros(sub.layout.split.padded, h.shape[1], dtype=h.dtype, device=h.device)
        x[dst] = h[src]
        s0, s1 = sub.layout.split.rows(rank)
        li_sub = m.packed_layer_inputs(sub.layout, sub.ropes, rank, sub.cache)
        y = self._gather(m.run_layers(x[s0:s1], li_sub, sub.attention, b0, b1))
        h = h.clone()
        h[src] = y[dst]
        return h


class PackedStep(PackedStepBase):
    """Single-device engine. ``use_graph`` (default: on CUDA) replays each recurring job layout from a CUDA graph;
    ``max_layouts``: how many job layouts (with their graphs) a long-lived engine keeps, the least recently used
    dropped first."""

    def __init__(self, model: BagelModel, align: int | None = None, use_graph: bool | None = None,
                 max_layouts: int = 4):
        super().__init__(model, align if align is not None else token_alignment(model.device, model.kernels), 1,
                         use_graph, max_layouts)

    def _attention(self, layout: PackedLayout, ctx: PackedContext) -> PackedAttention:
        return PackedAttention(layout, ctx, (0, layout.split.padded), options=self.model.kernels)

    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float],
                 plan: list[JobStep] | None = None) -> list[torch.Tensor]:
        """``plan``: each job's step-cache entry (``engine.cache``), when a request of the step caches."""
        check_jobs(jobs, xs, ts)
        self.forwards += 1
        self.jobs_run += len(jobs)
        if plan is not None and any(js.config.enabled for js in plan):
            return split_rows(*self._cached_rows(jobs, xs, ts, plan))
        e = self._entry(jobs)

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.packed_velocity_rows(x, t, e.layout, e.ropes, 0, e.attention, e.cache)

        return split_rows(self.graphs.run(e, forward, xs, ts, self.model.device), e.layout)
