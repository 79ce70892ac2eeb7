"""Plain-torch reference of the joint attention (fp32 math), written blockwise like the kernel.

It walks each KV segment in fixed blocks of ``REF_BLOCK_N`` keys from the segment's own start and keeps the fp32
online-softmax state (acc, m, l) between blocks, segments and launches. Every matmul has a fixed shape per block
and query rows are padded to a multiple of ``ROW_TILE``, so a query row's result does not depend on which other
rows, heads, sequences or ranks share the call (docs/DESIGN.md §3). Masked or padding keys give exact
zeros: the running max is unchanged, the rescale factor is exactly 1, and p = 0 against zero-filled V.
"""
from __future__ import annotations

import math

import torch

from .attention_types import AttentionState, ContiguousKV, PagedKV, Segment
from .linear import ROW_TILE

REF_BLOCK_N = 16


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _gather_segment(seg: Segment, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sequence padded (B, L, Hkv, D) K and V in fp32 plus a (B, L) validity mask; L is a multiple of the block."""
    if isinstance(seg, PagedKV):
        span = seg.span
        j = torch.arange(span, device=seg.k.device)
        bs = seg.block_size
        pages = seg.block_table.long()[:, j // bs]  # (B, L)
        slots = (j % bs).expand_as(pages)
        k = seg.k[pages, slots].float()
        v = seg.v[pages, slots].float()
        valid = j[None, :] < seg.seqlens.long()[:, None]
    else:
        t = seg.k.shape[0]
        span = seg.span
        j = torch.arange(span, device=seg.k.device)
        if seg.cu_seqlens is None:
            starts = torch.zeros(batch, dtype=torch.long, device=seg.k.device)
            lens = seg.seqlens.long() if seg.seqlens is not None else torch.full((batch,), t, device=seg.k.device)
        else:
            cu = seg.cu_seqlens.long()
            starts = cu[:-1]
            lens = seg.seqlens.long() if seg.seqlens is not None else cu[1:] - cu[:-1]
        idx = (starts[:, None] + j[None, :]).clamp(max=max(t - 1, 0))
        valid = (j[None, :] < lens[:, None]) & (starts[:, None] + j[None, :] < t)
        if t == 0:
            k = seg.k.new_zeros(batch, span, seg.k.shape[1], seg.k.shape[2]).float()
            v = k.clone()
        else:
            k, v = seg.k[idx].float(), seg.v[idx].float()
    pad = _round_up(span, REF_BLOCK_N) - span
    if pad:
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad))
        valid = torch.nn.functional.pad(valid, (0, pad), value=False)
    zero = ~valid[:, :, None, None]
    # Padding keys must be exact zeros (never garbage): 0 * finite stays 0, NaN would not.
    return k.masked_fill(zero, 0.0), v.masked_fill(zero, 0.0), valid


def attention_reference(
    q: torch.Tensor,
    segments: list[Segment],
    *,
    cu_seqlens_q: torch.Tensor | None,
    max_seqlen_q: int,
    scale: float,
    kv_head_of_q: torch.Tensor,
    visible_end: torch.Tensor | None,
    state: AttentionState | None,
) -> AttentionState:
    tq, hq, d = q.shape
    dev = q.device
    batch = 1 if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    mq = max(_round_up(max(max_seqlen_q, 1), ROW_TILE), ROW_TILE)
    i = torch.arange(mq, device=dev)
    if cu_seqlens_q is None:
        qstart = torch.zeros(1, dtype=torch.long, device=dev)
        qlen = torch.full((1,), tq, dtype=torch.long, device=dev)
    else:
        cu = cu_seqlens_q.long()
        qstart, qlen = cu[:-1], cu[1:] - cu[:-1]
    qvalid = i[None, :] < qlen[:, None]  # (B, Mq)
    # Rows past a sequence's end point at a dummy row tq, dropped on write-back.
    qidx = torch.where(qvalid, qstart[:, None] + i[None, :], torch.full_like(qvalid, tq, dtype=torch.long))
    qpad = torch.cat([q.float(), q.new_zeros(1, hq, d).float()], 0)[qidx]  # (B, Mq, Hq, D)
    qh = qpad.permute(0, 2, 1, 3)  # (B, Hq, Mq, D)

    if state is None:
        acc = torch.zeros(batch, hq, mq, d, device=dev)
        m = torch.full((batch, hq, mq), float("-inf"), device=dev)
        l = torch.zeros(batch, hq, mq, device=dev)
    else:
        def unpack(x, fill):
            xp = torch.cat([x, torch.full_like(x[:1], fill)], 0)[qidx]  # (B, Mq, Hq, ...)
            return xp.transpose(1, 2).contiguous()
        acc, m, l = unpack(state.acc, 0.0), unpack(state.m, float("-inf")), unpack(state.l, 0.0)

    vis = None
    if visible_end is not None:
        vpad = torch.cat([visible_end.long(), visible_end.new_zeros(1).long()], 0)[qidx]  # (B, Mq)
        vis = vpad[:, None, :, None]  # (B, 1, Mq, 1)

    for si, seg in enumerate(segments):
        k, v, valid = _gather_segment(seg, batch)
        k = k[:, :, kv_head_of_q].permute(0, 2, 3, 1)  # (B, Hq, D, L)
        v = v[:, :, kv_head_of_q].permute(0, 2, 1, 3)  # (B, Hq, L, D)
        masked_segment = vis is not None and si == len(segments) - 1
        for start in range(0, k.shape[-1], REF_BLOCK_N):
            kb = k[..., start:start + REF_BLOCK_N].contiguous()
            vb = v[:, :, start:start + REF_BLOCK_N].contiguous()
            ok = valid[:, None, None, start:start + REF_BLOCK_N]
            if masked_segment:
                ok = ok & (torch.arange(start, start + REF_BLOCK_N, device=dev) < vis)
            s = torch.matmul(qh, kb) * scale
            s = s.masked_fill(~ok, float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 instead so exp() gives 0, not NaN.
            m_use = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            alpha = torch.exp(m - m_use)
            p = torch.exp(s - m_use[..., None])
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.matmul(p, vb)
            m = m_new

    def pack(x: torch.Tensor) -> torch.Tensor:  # (B, Hq, Mq, ...) -> (Tq, Hq, ...)
        x = x.transpose(1, 2)
        buf = x.new_zeros((tq + 1,) + tuple(x.shape[2:]))
        buf.index_copy_(0, qidx.reshape(-1), x.reshape((-1,) + tuple(x.shape[2:])))
        return buf[:tq]

    return AttentionState(acc=pack(acc), m=pack(m), l=pack(l), backend="reference")


def finalize_reference(state: AttentionState, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    l = state.l
    # l == 0 exactly iff the row saw no key (finite inputs give l >= 0, so this is l > 0 bit for bit); a NaN query,
    # key or value makes l NaN, which counts as seen and surfaces as NaN like SDPA, never as a silent 0.
    seen = l != 0
    out = torch.where(seen[..., None], state.acc / torch.where(seen, l, torch.ones_like(l))[..., None], 0.0)
    lse = torch.where(seen, state.m + torch.log(torch.where(seen, l, torch.ones_like(l))), float("-inf"))
    return out.to(out_dtype), lse


def naive_attention(q, k, v, scale: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense float64 softmax(q k^T) v for tests: q (Tq, Hq, D), k/v (Tk, Hkv, D), mask (Tq, Tk) bool or None."""
    hq, hkv = q.shape[1], k.shape[1]
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    k = k.double().repeat_interleave(hq // hkv, dim=1)
    v = v.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v)
