"""The packed denoise step: every (request, CFG branch) job of a step in ONE forward through the layers.

Row layout of a packed forward (``PackedLayout``): all latent rows of all jobs first, job after job, then every
job's two image markers, then the token split's padding at the global tail:

    [lat_0 ... | lat_1 ... | ... | m0_0 m1_0 | m0_1 m1_1 | ... | pad]
     generation expert ------------ | understanding expert (markers and padding) -

so the routed GEMM sees two expert segments whatever the number of jobs (one branch laid out as
[marker, latents, marker] would cut the rows into three expert segments per job, each ending in its own partial
row tile: wasted tile work that grows with the number of jobs).

Why the bits do not change (docs/DESIGN.md §3, §8): every per-row op (norms, routed GEMMs, QK-norm + RoPE, embeddings)
gives a row the same arithmetic wherever the row sits, and attention walks each job's keys in the job's own order —
its context, then ``[<vision_start>, latents..., <vision_end>]`` blocked from that sequence's start — exactly what the
one-branch forward walks. Attention therefore reads K/V through a per-job *canonical* gather (``JobRows``), while the
queries stay in packed order (``QueryPlan``: each job's latents, then its markers, as varlen sequences that read that
job's keys), so neither the queries nor the output rows are moved. A job whose rows are computed in a pack with other
jobs gets the bits it gets alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch

from bagel_kernels import ContiguousKV, ExpertSegments, KernelOptions, PagedKV, joint_attention
from bagel_kernels.kv_layout import PagedKVView, read_tokens

from .token_split import TokenSplit


@dataclass(frozen=True)
class JobRows:
    """A set of packed rows grouped per job in canonical order, as device index/metadata tensors.

    ``index``: packed row indices (relative to the range start) of job 0's rows, then job 1's, ...; ``cu``: (J+1,)
    int32 offsets of each job in ``index``; ``max_len``: host bound of one job's row count."""

    index: torch.Tensor
    cu: torch.Tensor
    max_len: int
    starts: tuple[int, ...] = ()  # host copies of cu[:-1] and of each job's row count
    lengths: tuple[int, ...] = ()

    def per_sequence(self, jobs_of_seqs: tuple[int, ...], device, cache: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(starts (B+1), lengths (B)) device tensors for sequences reading job ``jobs_of_seqs[b]``'s rows."""
        return sequence_meta(self.starts, self.lengths, jobs_of_seqs, device, cache, ("rows", id(self)))


def sequence_meta(starts, lengths, jobs_of_seqs, device, cache: dict, owner) -> tuple[torch.Tensor, torch.Tensor]:
    """Varlen metadata of sequences that each read one job's rows of a per-job buffer: (starts (B+1; the last entry
    unused), lengths (B)) on the device, made once per (``owner``, sequence-to-job map) and kept in ``cache``."""
    key = (owner, tuple(jobs_of_seqs))
    if key not in cache:
        cache[key] = (device_values([starts[j] for j in jobs_of_seqs] + [0], device),
                      device_values([lengths[j] for j in jobs_of_seqs], device))
    return cache[key]


@dataclass(frozen=True)
class QueryPlan:
    """Query rows [a, b) of a packed layout as varlen sequences IN PACKED ORDER — each job's latents in the range,
    then each job's markers in the range — so the queries need no gather and the output no scatter. Sequence b
    belongs to job ``jobs[b]``; rows from ``covered`` on are tail padding (not attended)."""

    cu: torch.Tensor
    jobs: tuple[int, ...]
    max_len: int
    covered: int


def _device_index(spans: list[tuple[int, int]], device) -> torch.Tensor:
    """Concatenated aranges of host spans, built on the device (no host-to-device copy, no synchronization)."""
    parts = [torch.arange(a, b, dtype=torch.int64, device=device) for a, b in spans if b > a]
    if not parts:
        return torch.zeros(0, dtype=torch.int64, device=device)
    return torch.cat(parts)


def device_values(values: list, device, dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """A small tensor filled element by element from host numbers (fills launch kernels; nothing is copied from the
    host, so nothing synchronizes). A float becomes its ``dtype`` rounding, as ``torch.full((1,), t)`` gives it."""
    out = torch.empty(len(values), dtype=dtype, device=device)
    for i, v in enumerate(values):
        out[i:i + 1].fill_(v)
    return out


@dataclass(frozen=True)
class PackedLayout:
    """Where every job's rows live in a packed forward split over ``degree`` sequence-parallel ranks."""

    grids: tuple[tuple[int, int], ...]
    degree: int = 1
    align: int = 16

    def __post_init__(self):
        if not self.grids:
            raise ValueError("a packed step needs at least one job")
        for g in self.grids:
            if len(g) != 2 or g[0] < 1 or g[1] < 1:
                raise ValueError(f"latent grid must be two positive ints, got {g}")

    @property
    def num_jobs(self) -> int:
        return len(self.grids)

    @cached_property
    def n_latent(self) -> tuple[int, ...]:
        return tuple(h * w for h, w in self.grids)

    @cached_property
    def latent_offset(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.n_latent:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def latent_rows(self) -> int:
        return sum(self.n_latent)

    @cached_property
    def split(self) -> TokenSplit:
        return TokenSplit(self.latent_rows + 2 * self.num_jobs, self.degree, self.align)

    def marker_rows(self, j: int) -> tuple[int, int]:
        """Packed rows of job ``j``'s <vision_start> and <vision_end>."""
        m = self.latent_rows + 2 * j
        return m, m + 1

    def routing(self, rank: int) -> ExpertSegments:
        """Latents use the generation expert; markers and tail padding the understanding expert (padding rows are
        zeros whose results are dropped: joining them to the marker segment keeps the launch at two segments)."""
        n_lat, padded = self.latent_rows, self.split.padded
        whole = ExpertSegments(((0, n_lat, True), (n_lat, padded, False)))
        return whole.slice(*self.split.rows(rank))

    def job_spans(self, j: int, a: int, b: int) -> list[tuple[int, int]]:
        """Job ``j``'s rows inside the packed range [a, b), in canonical order: marker, latents, marker."""
        m0, m1 = self.marker_rows(j)
        lo, hi = self.latent_offset[j], self.latent_offset[j] + self.n_latent[j]
        spans = [(m0, m0 + 1), (max(lo, a), min(hi, b)), (m1, m1 + 1)]
        return [(max(s, a), min(e, b)) for s, e in spans if max(s, a) < min(e, b)]

    def rows_by_job(self, a: int, b: int, device) -> JobRows:
        """Rows [a, b) grouped per job in canonical order; indices relative to ``a``."""
        spans, cu, max_len = [], [0], 0
        for j in range(self.num_jobs):
            js = self.job_spans(j, a, b)
            spans += [(s - a, e - a) for s, e in js]
            n = sum(e - s for s, e in js)
            cu.append(cu[-1] + n)
            max_len = max(max_len, n)
        return JobRows(_device_index(spans, device), device_values(cu, device), max_len, tuple(cu[:-1]),
                       tuple(b - a for a, b in zip(cu, cu[1:])))

    def query_plan(self, a: int, b: int, device) -> QueryPlan:
        """The rows [a, b) as query sequences in packed order (see ``QueryPlan``)."""
        lens, jobs = [], []
        for j, (off, n) in enumerate(zip(self.latent_offset, self.n_latent)):
            k = min(off + n, b) - max(off, a)
            if k > 0:
                lens.append(k)
                jobs.append(j)
        for j in range(self.num_jobs):
            m0, _ = self.marker_rows(j)
            k = min(m0 + 2, b) - max(m0, a)
            if k > 0:
                lens.append(k)
                jobs.append(j)
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        return QueryPlan(device_values(cu, device), tuple(jobs), max(lens, default=1), cu[-1])

    def job_of_latent_rows(self, a: int, b: int, device) -> torch.Tensor:
        """Job index of each latent row in [a, b) (latent rows only), on the device."""
        out = torch.empty(max(0, min(b, self.latent_rows) - a), dtype=torch.int64, device=device)
        for j, (off, n) in enumerate(zip(self.latent_offset, self.n_latent)):
            s, e = max(off, a), min(off + n, b)
            if s < e:
                out[s - a:e - a].fill_(j)
        return out


@dataclass
class PackedContext:
    """The jobs' contexts concatenated per layer (job j's keys at rows ``starts[j] : starts[j] + lengths[j]``);
    ``layers[i]`` is None when no job has a context."""

    layers: list[tuple[torch.Tensor, torch.Tensor] | None]
    starts: list[int]
    lengths: list[int]

    def heads(self, a: int, b: int) -> "PackedContext":
        """KV heads [a, b) only (a Ulysses rank reads the KV heads its query heads need)."""
        return PackedContext([None if kv is None else (kv[0][:, a:b], kv[1][:, a:b]) for kv in self.layers],
                             self.starts, self.lengths)

    def segment(self, layer: int, jobs_of_seqs: list[int], device, cache: dict) -> ContiguousKV | None:
        """Layer ``layer``'s context as a varlen segment whose sequence b holds the context of job
        ``jobs_of_seqs[b]`` (an empty context is a zero-length sequence: it walks no key block, so the softmax state
        stays what no context at all gives)."""
        kv = self.layers[layer]
        if kv is None or not jobs_of_seqs:
            return None
        starts, lens = sequence_meta(self.starts, self.lengths, jobs_of_seqs, device, cache, "context")
        return ContiguousKV(kv[0], kv[1], cu_seqlens=starts, seqlens=lens,
                            max_seqlen=max(max(self.lengths[j] for j in jobs_of_seqs), 1))


def packed_context(contexts: list[list[ContiguousKV | PagedKV | None] | None], lengths: list[int],
                   num_layers: int) -> PackedContext:
    """The jobs' contexts in one buffer per layer. Paged contexts are read out contiguously once (per packed
    layout, not per step); the kernel walks a sequence's keys in fixed blocks from its own start either way, so the
    bits do not change."""
    starts, acc = [], 0
    for n in lengths:
        starts.append(acc)
        acc += n
    if acc == 0:
        return PackedContext([None] * num_layers, starts, list(lengths))
    layers = []
    for layer in range(num_layers):
        ks, vs = [], []
        for ctx, n in zip(contexts, lengths):
            seg = ctx[layer] if ctx is not None and n > 0 else None
            if seg is None:
                continue
            if isinstance(seg, PagedKV):
                k, v = read_tokens(PagedKVView(seg.k, seg.v), seg.block_table[0], n)
            else:
                k, v = seg.k[:n], seg.v[:n]
            ks.append(k)
            vs.append(v)
        layers.append((torch.cat(ks).contiguous(), torch.cat(vs).contiguous()))
    return PackedContext(layers, starts, list(lengths))


def packed_attention(q: torch.Tensor, keys: tuple[torch.Tensor, torch.Tensor], key_rows: JobRows,
                     ctx: ContiguousKV | None, plan: QueryPlan, cache: dict, gqa_group: int | None = None,
                     q_head_offset: int = 0, with_lse: bool = False, options: KernelOptions | None = None):
    """Attention of packed query rows ``q`` (their ``plan``) against, per job, its context ``ctx`` (a segment from
    ``PackedContext.segment`` for ``plan.jobs``) and its own keys: ``keys`` holds packed K/V rows that
    ``key_rows`` gathers into each job's canonical order. The output is in ``q``'s packed order."""
    if not plan.jobs:  # a rank holding only tail padding: nothing to attend
        out = torch.zeros_like(q)
        return (out, torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)) if with_lse else out
    index = key_rows.index
    kc, vc = keys[0].index_select(0, index), keys[1].index_select(0, index)
    starts, lens = key_rows.per_sequence(plan.jobs, q.device, cache)
    cur = ContiguousKV(kc, vc, cu_seqlens=starts, seqlens=lens, max_seqlen=max(key_rows.max_len, 1))
    out = torch.empty_like(q)
    if plan.covered < q.shape[0]:
        out[plan.covered:].zero_()  # tail padding rows: no sequence writes them
    r = joint_attention(q, ([ctx] if ctx is not None else []) + [cur], cu_seqlens_q=plan.cu, max_seqlen_q=plan.max_len,
                        gqa_group=gqa_group, q_head_offset=q_head_offset, out=out, options=options)
    return (r.out, r.lse) if with_lse else r.out


@dataclass
class PackedAttention:
    """``AttentionFn`` of a packed forward whose K/V rows cover the whole packed sequence (one device, or a Ulysses
    rank after its all-to-all): rows ``q_range`` are the queries it holds."""

    layout: PackedLayout
    ctx: PackedContext
    q_range: tuple[int, int]
    gqa_group: int | None = None
    q_head_offset: int = 0
    options: KernelOptions | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def plans(self, device) -> tuple[QueryPlan, JobRows]:
        if "plan" not in self._cache:
            self._cache["plan"] = (self.layout.query_plan(*self.q_range, device),
                                   self.layout.rows_by_job(0, self.layout.split.padded, device))
        return self._cache["plan"]

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        plan, key_rows = self.plans(q.device)
        ctx = self.ctx.segment(layer_idx, plan.jobs, q.device, self._cache)
        return packed_attention(q, (k, v), key_rows, ctx, plan, self._cache, self.gqa_group, self.q_head_offset,
                                options=self.options)
