"""ONE entry point for every attention call BAGEL makes: ``joint_attention``.

Queries attend an ordered list of KV segments (e.g. the frozen paged context cache, then the current tokens' own
K/V). Each segment is blocked from its own start in a fixed order, so the bits of an output row never depend on the
other rows, heads, sequences or ranks in the launch. The state can be carried across launches (resumable attention,
used by exact ring attention); ``finalize=False`` returns it instead of the output.

Backends (``KernelOptions``; ``joint_attention`` is the one place that chooses): the plain-torch reference (CPU),
the Triton kernel (CUDA; the CPU interpreter in tests), and on Hopper the warp-specialized Gluon kernel for the
common launch (``attention_gluon.gluon_attention_supported``) — bit for bit the Triton kernel's rows.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import resolve_backend, use_gluon
from ._launch import TRITON_BLOCK_M, TRITON_BLOCK_N
from .attention_gluon import attention_gluon, gluon_attention_supported
from .attention_reference import REF_BLOCK_N, attention_reference, finalize_reference
from .attention_triton import attention_triton
from .attention_types import AttentionOutput, AttentionState, ContiguousKV, PagedKV, Segment
from .linear import ROW_TILE
from .options import KernelOptions, resolve_options

__all__ = ["joint_attention", "token_alignment", "prefill_visible_end", "check_block_tables"]


def token_alignment(device: torch.device | str, options: KernelOptions | None = None) -> int:
    """Row alignment for token splits: a multiple of the backend's fixed query and KV blocks, so every real token
    keeps its block position (and its row position inside a query tile) in every parallel layout
    (docs/DESIGN.md §3)."""
    if resolve_backend(torch.device(device), options) == "triton":
        return max(TRITON_BLOCK_M, TRITON_BLOCK_N)
    return max(REF_BLOCK_N, ROW_TILE)


def prefill_visible_end(span_ids: torch.Tensor) -> torch.Tensor:
    """Per-token visibility bound of a packed multimodal prompt, computed on the device.

    ``span_ids[i] == -1`` marks a text token (causal: it sees keys ``< i+1``); tokens sharing an id ``>= 0`` form one
    image span and all see up to that span's end (bidirectional inside the span, causal towards the text after it).
    """
    if span_ids.dim() != 1:
        raise ValueError(f"span_ids must be 1-D (tokens,), got shape {tuple(span_ids.shape)}")
    n = span_ids.shape[0]
    pos = torch.arange(n, device=span_ids.device)
    img = span_ids >= 0
    sid = torch.where(img, span_ids.long(), torch.zeros_like(span_ids, dtype=torch.long)).clamp(max=max(n - 1, 0))
    ends = torch.zeros(max(n, 1), dtype=torch.long, device=span_ids.device)
    ends = ends.scatter_reduce(0, sid, torch.where(img, pos + 1, torch.zeros_like(pos)), reduce="amax")
    return torch.where(img, ends[sid], pos + 1).to(torch.int32)


_host_list = torch.Tensor.tolist  # bound at import: reading a host tensor is no device sync (see _host_values)


def _host_values(t: torch.Tensor | None) -> list[int] | None:
    """The values of a small host (CPU) tensor, else None. Index tensors on the GPU are not read (that would be a
    device sync inside the no-sync denoise loop); on the host, an out-of-range index corrupts the heap under the
    Triton interpreter, and reading a few ints costs microseconds."""
    if t is None or t.device.type != "cpu":
        return None
    if t.dim() != 1:
        raise ValueError(f"index tensor must be 1-D, got shape {tuple(t.shape)}")
    return _host_list(t)


def _check_offsets(name: str, cu: list[int], total: int, bound: int | None = None) -> list[int]:
    """``cu`` is a valid cumulative-length array into ``total`` rows; returns the per-sequence lengths."""
    if len(cu) < 2 or cu[0] != 0:
        raise ValueError(f"{name} must start at 0 and hold B+1 >= 2 offsets, got {cu[:8]}")
    lens = [b - a for a, b in zip(cu, cu[1:])]
    if min(lens) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {cu[:8]}")
    if cu[-1] > total:
        raise ValueError(f"{name} ends at {cu[-1]}, beyond the {total} rows given")
    if bound is not None and max(lens) > bound:
        raise ValueError(f"{name} has a sequence of {max(lens)} rows, beyond its bound {bound}")
    return lens


def _check_indices(q: torch.Tensor, segments: list[Segment], cu_seqlens_q, max_seqlen_q) -> None:
    """Offsets and lengths that live on the host stay within the tensors they index (a validated error instead of
    an out-of-bounds read)."""
    cu = _host_values(cu_seqlens_q)
    if cu is not None:
        _check_offsets("cu_seqlens_q", cu, q.shape[0], max_seqlen_q)
    for i, s in enumerate(segments):
        lens = _host_values(s.seqlens)
        if isinstance(s, ContiguousKV):
            cuk = _host_values(s.cu_seqlens)
            if cuk is not None and lens is not None:  # starts + lengths: starts in any order, rows may be shared
                room = [s.k.shape[0] - a for a in cuk[:-1]]
                if len(cuk) != len(lens) + 1 or min(cuk) < 0 or any(not 0 <= n <= r for n, r in zip(lens, room)):
                    raise ValueError(f"segment {i}: seqlens {lens[:8]} exceed the rows the KV holds {room[:8]} "
                                     f"from their starts {cuk[:8]} (or are negative)")
                continue
            room = _check_offsets(f"segment {i} cu_seqlens", cuk, s.k.shape[0], s.max_seqlen) if cuk is not None else None
            if lens is not None:
                room = room if room is not None else [s.k.shape[0]] * len(lens)
                if len(lens) != len(room) or any(not 0 <= n <= r for n, r in zip(lens, room)):
                    raise ValueError(f"segment {i}: seqlens {lens[:8]} exceed the rows the KV holds {room[:8]} "
                                     "(or are negative)")
        else:
            if lens is not None and (len(lens) != s.block_table.shape[0] or any(not 0 <= n <= s.span for n in lens)):
                raise ValueError(f"segment {i}: paged seqlens {lens[:8]} exceed the {s.span} slots its block table "
                                 f"maps per sequence ({s.block_table.shape[0]} sequences), or are negative")
            if s.block_table.device.type == "cpu":  # a device table is a documented precondition (check_block_tables)
                _check_block_table(i, s)


def _check_block_table(i: int, s: PagedKV) -> None:
    """Every page id of ``s.block_table`` names a page of the pool: an id past it makes the Triton kernel read
    memory it does not own (no error, garbage rows). Reads the table's min and max (one sync for a device table)."""
    bt = s.block_table
    if bt.dim() != 2:
        raise ValueError(f"segment {i}: block_table must be (sequences, pages), got shape {tuple(bt.shape)}")
    if bt.dtype.is_floating_point or bt.dtype == torch.bool or bt.dtype.is_complex:
        raise TypeError(f"segment {i}: block_table must hold integer page ids, got {bt.dtype}")
    if bt.numel() == 0:
        return
    lo, hi = _host_list(torch.stack([bt.min(), bt.max()]))  # a host table: no device sync (see _host_values)
    pool = s.k.shape[0]
    if lo < 0 or hi >= pool:
        bad = bt[(bt < 0) | (bt >= pool)]
        raise ValueError(f"segment {i}: block_table holds page id(s) {bad[:8].tolist()} outside the pool of {pool} "
                         f"pages [0, {pool})")


def check_block_tables(segments: list[Segment]) -> None:
    """Debug check of a launch's paged segments whose block tables live on the GPU: every page id within its
    pool. ``joint_attention`` checks host (CPU) tables itself; a device table is a precondition it does not read
    (that would be a device sync inside the no-sync denoise loop), so call this where a table is built or in a
    debug run. Syncs the device once per paged segment."""
    for i, s in enumerate(segments):
        if isinstance(s, PagedKV):
            _check_block_table(i, s)


def _check(q: torch.Tensor, segments: list[Segment], cu_seqlens_q, gqa_group, q_head_offset,
           max_seqlen_q: int | None = None) -> int:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch tensor, got {type(q).__module__}.{type(q).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be (tokens, heads, head_dim), got shape {tuple(q.shape)}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"q dtype {q.dtype} not supported; use float32, float16 or bfloat16")
    if not segments:
        raise ValueError("joint_attention needs at least one KV segment")
    tq, hq, d = q.shape
    hkv = segments[0].num_kv_heads
    for i, s in enumerate(segments):
        if not isinstance(s, (ContiguousKV, PagedKV)):
            raise TypeError(f"segment {i} is {type(s).__name__}; expected ContiguousKV or PagedKV")
        if not isinstance(s.k, torch.Tensor) or not isinstance(s.v, torch.Tensor):
            raise TypeError(f"segment {i}: K/V must be torch tensors, got {type(s.k).__module__}.{type(s.k).__name__} "
                            f"/ {type(s.v).__module__}.{type(s.v).__name__}")
        for name, t in (("K", s.k), ("V", s.v)):
            if t.shape[-1] != d:
                raise ValueError(f"segment {i}: {name} head_dim {t.shape[-1]} does not match q's head_dim {d}")
        if s.num_kv_heads != hkv or s.v.shape != s.k.shape:
            raise ValueError(f"segment {i}: K/V heads or shapes disagree ({tuple(s.k.shape)} vs {tuple(s.v.shape)}, "
                             f"expected {hkv} KV heads)")
        if s.k.dtype != q.dtype or s.v.dtype != q.dtype:
            raise TypeError(f"segment {i}: K/V dtype {s.k.dtype} differs from q dtype {q.dtype}")
        if s.k.device != q.device:
            raise ValueError(f"segment {i} is on {s.k.device}, q on {q.device}")
        if isinstance(s, ContiguousKV) and s.cu_seqlens is None and cu_seqlens_q is not None and cu_seqlens_q.shape[0] > 2:
            raise ValueError(f"segment {i}: a varlen batch needs cu_seqlens on every contiguous segment")
        if isinstance(s, PagedKV) and cu_seqlens_q is not None and s.block_table.shape[0] != cu_seqlens_q.shape[0] - 1:
            raise ValueError(f"segment {i}: block_table has {s.block_table.shape[0]} rows for {cu_seqlens_q.shape[0] - 1} sequences")
    if gqa_group is not None and (isinstance(gqa_group, bool) or not isinstance(gqa_group, int) or gqa_group < 1):
        raise ValueError(f"gqa_group must be a positive integer (query heads per KV head), got {gqa_group!r}")
    if isinstance(q_head_offset, bool) or not isinstance(q_head_offset, int) or q_head_offset < 0:
        raise ValueError(f"q_head_offset must be a non-negative integer, got {q_head_offset!r}")
    if max_seqlen_q is not None and max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")
    if max_seqlen_q is not None and cu_seqlens_q is None and max_seqlen_q < q.shape[0]:
        # one sequence of all q's rows: a smaller bound would leave its tail rows uncomputed (a wrong result)
        raise ValueError(f"max_seqlen_q {max_seqlen_q} is smaller than the single sequence's {q.shape[0]} query rows")
    _check_indices(q, segments, cu_seqlens_q, max_seqlen_q)
    g = gqa_group if gqa_group is not None else None
    if g is None:
        if hq % hkv:
            raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads (GQA); pass gqa_group")
        g = hq // hkv
    # Host arithmetic only: this runs inside the no-sync denoise loop.
    if (q_head_offset + hq - 1) // g - q_head_offset // g >= hkv:
        raise ValueError(f"query heads {q_head_offset}..{q_head_offset + hq - 1} with GQA group {g} need KV heads "
                         f"{q_head_offset // g}..{(q_head_offset + hq - 1) // g}, but only {hkv} are given")
    return g


def joint_attention(
    q: torch.Tensor,
    segments: list[Segment],
    *,
    cu_seqlens_q: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    scale: float | None = None,
    visible_end: torch.Tensor | None = None,
    gqa_group: int | None = None,
    q_head_offset: int = 0,
    state: AttentionState | None = None,
    finalize: bool = True,
    options: KernelOptions | None = None,
    out: torch.Tensor | None = None,
) -> AttentionOutput | AttentionState:
    """Attention of ``q`` (Tq, Hq, D) over ``segments`` in order.

    - GQA without expanding K/V: query head h (global index ``q_head_offset + h``) reads KV head
      ``(q_head_offset + h) // gqa_group - q_head_offset // gqa_group`` of the given K/V.
    - varlen: ``cu_seqlens_q`` (B+1) with host bound ``max_seqlen_q``; every segment holds B sequences.
    - ``visible_end`` (Tq,) int: prefill mask on the LAST segment (key j visible iff j < visible_end[i],
      sequence-local); earlier segments (the context) are fully visible. See ``prefill_visible_end``.
    - ``state``/``finalize``: resume from and/or return the fp32 running state (exact ring attention).
    - ``out``: optional preallocated (Tq, Hq, D) output the result is written into.
    - ``options``: which kernel runs (``KernelOptions.backend``) and the Gluon kernel's schedule.
    """
    group = _check(q, segments, cu_seqlens_q, gqa_group, q_head_offset, max_seqlen_q)
    tq, hq, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    if not 0 < scale < math.inf:  # NaN fails too; an infinite scale makes every row NaN (inf - inf)
        raise ValueError(f"softmax scale must be positive and finite, got {scale}")
    if max_seqlen_q is None:
        max_seqlen_q = tq
    if visible_end is not None and visible_end.shape != (tq,):
        raise ValueError(f"visible_end must have shape ({tq},), got {tuple(visible_end.shape)}")
    opts = resolve_options(options)
    which = resolve_backend(q.device, opts)
    if state is not None and state.backend != which:
        raise ValueError(f"attention state was made by the {state.backend!r} backend, cannot resume on {which!r}")
    if which == "triton":
        if use_gluon(q.device, q.dtype, opts) and gluon_attention_supported(q, segments, visible_end, state, finalize,
                                                                            out):
            # Hopper, the common launch: the warp-specialized kernel, bit for bit the Triton kernel's arithmetic.
            return attention_gluon(q, segments, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, scale=scale,
                                   gqa_group=group, q_head_offset=q_head_offset, out=out,
                                   schedule=opts.attention_schedule)
        return attention_triton(q, segments, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, scale=scale,
                                gqa_group=group, q_head_offset=q_head_offset, visible_end=visible_end, state=state,
                                finalize=finalize, out=out)
    kv_of_q = (q_head_offset + torch.arange(hq, device=q.device)) // group - q_head_offset // group
    new_state = attention_reference(q, segments, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, scale=scale,
                                    kv_head_of_q=kv_of_q, visible_end=visible_end, state=state)
    if not finalize:
        return new_state
    o, lse = finalize_reference(new_state, q.dtype)
    if out is not None:
        out.copy_(o)
        o = out
    return AttentionOutput(out=o, lse=lse)
