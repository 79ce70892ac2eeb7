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

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._pool = None

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
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                e.out_static = forward(e.x_static, e.t_static)
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


class PackedStepBase:
    """What both step engines share: a job layout's entry (layout, packed contexts, attention, caches), made on its
    first step and kept while it recurs, and the graph runner. ``degree``: the sequence-parallel split of a
    forward; subclasses give the attention that suits it."""

    def __init__(self, model: BagelModel, align: int, degree: int, use_graph: bool | None = None,
                 max_layouts: int = 4):
        if max_layouts < 1:
            raise ValueError(f"max_layouts must be >= 1, got {max_layouts}")
        self.model, self.align, self.degree, self.max_layouts = model, align, degree, max_layouts
        use_graph = model.device.type == "cuda" if use_graph is None else use_graph
        if use_graph and model.device.type != "cuda":
            raise ValueError("CUDA-graph replay needs a CUDA model")
        self.graphs = GraphedForwards(use_graph)
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

    def __call__(self, jobs: list[GenJob], xs: list[torch.Tensor], ts: list[float]) -> list[torch.Tensor]:
        check_jobs(jobs, xs, ts)
        e = self._entry(jobs)
        self.forwards += 1
        self.jobs_run += len(jobs)

        def forward(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.model.packed_velocity_rows(x, t, e.layout, e.ropes, 0, e.attention, e.cache)

        return split_rows(self.graphs.run(e, forward, xs, ts, self.model.device), e.layout)
