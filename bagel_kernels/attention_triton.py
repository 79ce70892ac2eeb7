"""Triton joint attention: GQA-native, segmented (paged context + current tokens), varlen, resumable.

One program = one (query block, query head, sequence). It walks segment 0 (the frozen context: paged through a
block table, or contiguous) and then segment 1 (the current tokens), each in fixed BLOCK_N blocks from the
segment's own start, carrying the fp32 online-softmax state (acc, m, l) in registers; ``state`` in/out moves the
same state through memory so that chunked launches equal one launch bit for bit. Tile shapes and warps are fixed
per (dtype, head_dim) — never chosen from the problem size — which is what makes the kernel batch-invariant.
More than two segments run as chained launches through the state.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._dispatch import triton_interpreting
from .attention_types import AttentionOutput, AttentionState, ContiguousKV, PagedKV

TRITON_BLOCK_M = 128
TRITON_BLOCK_N = 64
LOG2E = 1.4426950408889634


def tile_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Fixed launch configuration per (dtype, head_dim). Never depends on sequence lengths (exactness).

    ``BAGEL_ATTN_WARPS_STAGES="warps,stages"`` overrides the warps/stages for benchmark exploration only; block
    shapes stay fixed because the token split of parallel runs aligns to them."""
    import os

    ws = os.environ.get("BAGEL_ATTN_WARPS_STAGES")
    if ws and dtype != torch.float32:
        w, s = (int(x) for x in ws.split(","))
        return dict(BLOCK_M=TRITON_BLOCK_M, BLOCK_N=TRITON_BLOCK_N, num_warps=w, num_stages=s)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=TRITON_BLOCK_N, num_warps=4, num_stages=2)
    return dict(BLOCK_M=TRITON_BLOCK_M, BLOCK_N=TRITON_BLOCK_N, num_warps=8 if head_dim >= 128 else 4, num_stages=3)


@triton.jit
def _block_update(acc, m_i, l_i, q, k_t, v, valid, qk_scale, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:  # Triton 3.6's interpreter mishandles 16-bit dot operands; fp32 holds their products exactly
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    s = tl.dot(q, k_t, input_precision=DOT_PREC) * qk_scale  # (BM, BN), log2 units
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key keeps m = -inf: subtract 0 so exp2 gives 0 rather than NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _attn_fwd(
    Q, s_qt, s_qh,
    K0, V0, s_k0b, s_k0t, s_k0h, s_v0b, s_v0t, s_v0h, BT0, s_bt0, PAGE0, CU0, LEN0,
    K1, V1, s_k1t, s_k1h, s_v1t, s_v1h, CU1, LEN1,
    CU_Q, VIS, ACC, M, L, OUT, s_ot, s_oh, LSE,
    qk_scale, G, HEAD_OFF, D, HQ,
    HAS_CTX: tl.constexpr, CTX_PAGED: tl.constexpr, HAS_CUR: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_STATE: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    if pid_m * BLOCK_M >= q_len:
        return
    kvh = (HEAD_OFF + h) // G - HEAD_OFF // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < q_len
    d_ok = offs_d < D
    rows = (q_start + offs_m).to(tl.int64)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + rows[:, None] * s_qt + h * s_qh + offs_d[None, :], mask=tile_ok, other=0.0)
    # State tensors are contiguous (Tq, Hq, D) and (Tq, Hq).
    st_rows = rows * HQ + h
    if HAS_STATE:
        acc = tl.load(ACC + st_rows[:, None] * D + offs_d[None, :], mask=tile_ok, other=0.0)
        m_i = tl.load(M + st_rows, mask=row_ok, other=float("-inf"))
        l_i = tl.load(L + st_rows, mask=row_ok, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- segment 0: the context, fully visible; paged through a block table or contiguous ----
    if HAS_CTX:
        c_len = tl.load(LEN0 + b)
        c_base = 0
        if not CTX_PAGED:
            c_base = tl.load(CU0 + b)
        for start in range(0, c_len, BLOCK_N):
            j = start + offs_n
            ok = j < c_len
            if CTX_PAGED:
                page = tl.load(BT0 + b * s_bt0 + j // PAGE0, mask=ok, other=0).to(tl.int64)
                slot = (j % PAGE0).to(tl.int64)
                kp = K0 + page[None, :] * s_k0b + slot[None, :] * s_k0t + kvh * s_k0h + offs_d[:, None]
                vp = V0 + page[:, None] * s_v0b + slot[:, None] * s_v0t + kvh * s_v0h + offs_d[None, :]
            else:
                t = (c_base + j).to(tl.int64)
                kp = K0 + t[None, :] * s_k0t + kvh * s_k0h + offs_d[:, None]
                vp = V0 + t[:, None] * s_v0t + kvh * s_v0h + offs_d[None, :]
            k_t = tl.load(kp, mask=ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(vp, mask=ok[:, None] & d_ok[None, :], other=0.0)
            acc, m_i, l_i = _block_update(acc, m_i, l_i, q, k_t, v, ok[None, :], qk_scale, DOT_PREC, UPCAST)

    # ---- segment 1: the current tokens, contiguous, optionally masked by visible_end ----
    if HAS_CUR:
        g_base = tl.load(CU1 + b)
        g_len = tl.load(LEN1 + b)
        hi = g_len
        if HAS_MASK:
            vis = tl.load(VIS + rows, mask=row_ok, other=0)
            # Blocks past every row's bound are fully masked: skipping them is bit-identical (they add exact 0).
            hi = tl.minimum(g_len, tl.max(vis, 0))
        for start in range(0, hi, BLOCK_N):
            j = start + offs_n
            ok = j < g_len
            t = (g_base + j).to(tl.int64)
            k_t = tl.load(K1 + t[None, :] * s_k1t + kvh * s_k1h + offs_d[:, None], mask=ok[None, :] & d_ok[:, None], other=0.0)
            v = tl.load(V1 + t[:, None] * s_v1t + kvh * s_v1h + offs_d[None, :], mask=ok[:, None] & d_ok[None, :], other=0.0)
            valid = ok[None, :]
            if HAS_MASK:
                valid = valid & (j[None, :] < vis[:, None])
            acc, m_i, l_i = _block_update(acc, m_i, l_i, q, k_t, v, valid, qk_scale, DOT_PREC, UPCAST)

    if FINALIZE:
        seen = l_i > 0
        l_safe = tl.where(seen, l_i, 1.0)
        o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
        tl.store(OUT + rows[:, None] * s_ot + h * s_oh + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=tile_ok)
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + st_rows, lse, mask=row_ok)
    else:
        tl.store(ACC + st_rows[:, None] * D + offs_d[None, :], acc, mask=tile_ok)
        tl.store(M + st_rows, m_i, mask=row_ok)
        tl.store(L + st_rows, l_i, mask=row_ok)


def _seq_meta(seg: ContiguousKV, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens start offsets, valid lengths) of a contiguous segment as int32 device tensors."""
    if seg.cu_seqlens is None:
        cu = torch.zeros(batch + 1, dtype=torch.int32, device=device)
        lens = seg.seqlens if seg.seqlens is not None else torch.full((batch,), seg.k.shape[0], dtype=torch.int32, device=device)
    else:
        cu = seg.cu_seqlens
        lens = seg.seqlens if seg.seqlens is not None else cu[1:] - cu[:-1]
    return cu.to(torch.int32), lens.to(torch.int32)


def _launches(segments: list) -> list[tuple[object | None, ContiguousKV | None]]:
    """Group segments into (context-slot, current-slot) launches, in order."""
    out: list[tuple[object | None, ContiguousKV | None]] = []
    i = 0
    while i < len(segments):
        a = segments[i]
        b = segments[i + 1] if i + 1 < len(segments) else None
        if isinstance(b, ContiguousKV):
            out.append((a, b))
            i += 2
        elif isinstance(a, ContiguousKV) and i == len(segments) - 1:
            out.append((None, a))
            i += 1
        else:
            out.append((a, None))
            i += 1
    return out


def attention_triton(q, segments, *, cu_seqlens_q, max_seqlen_q, scale, gqa_group, q_head_offset, visible_end, state,
                     finalize, out=None):
    tq, hq, d = q.shape
    dev = q.device
    batch = 1 if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    if cu_seqlens_q is None:
        # arange * scalar runs on the device; `cu_q[1] = tq` would copy through the host and synchronize.
        cu_q = torch.arange(2, dtype=torch.int32, device=dev) * tq
    else:
        cu_q = cu_seqlens_q.to(torch.int32)
    if visible_end is not None and not isinstance(segments[-1], ContiguousKV):
        raise ValueError("the prefill mask applies to the last segment, which must be contiguous (the current tokens)")
    if q.stride(-1) != 1:
        q = q.contiguous()
    g, off = gqa_group, q_head_offset  # GQA: query head h reads KV head (off + h) // g - off // g
    cfg = tile_config(q.dtype, d)
    head_dim = max(16, triton.next_power_of_2(d))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    plan = _launches(segments)
    acc = m = l = None
    if state is not None:
        acc, m, l = state.acc.contiguous(), state.m.contiguous(), state.l.contiguous()
    out_buf, out, lse = out, None, None
    if out_buf is not None and (out_buf.shape != q.shape or out_buf.dtype != q.dtype or out_buf.device != q.device):
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} on {q.device}, got {tuple(out_buf.shape)} {out_buf.dtype}")
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    for li, (ctx, cur) in enumerate(plan):
        last = li == len(plan) - 1
        fin = finalize and last
        if fin:
            out = out_buf if out_buf is not None else torch.empty_like(q)
            lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
        has_state = acc is not None
        if not fin:
            new_acc = torch.empty(tq, hq, d, dtype=torch.float32, device=dev)
            new_m = torch.empty(tq, hq, dtype=torch.float32, device=dev)
            new_l = torch.empty(tq, hq, dtype=torch.float32, device=dev)
        if ctx is None:
            k0 = v0 = q
            k0s = v0s = (0, 0, 0)
            bt0, s_bt0, page0, cu0, len0, paged = dummy_i, 0, 1, dummy_i, dummy_i, False
        elif isinstance(ctx, PagedKV):
            k0, v0 = ctx.k, ctx.v
            _check_inner(k0, v0)
            k0s, v0s = (k0.stride(0), k0.stride(1), k0.stride(2)), (v0.stride(0), v0.stride(1), v0.stride(2))
            bt0, s_bt0, page0 = ctx.block_table.to(torch.int32), ctx.block_table.stride(0), ctx.block_size
            cu0, len0, paged = dummy_i, ctx.seqlens.to(torch.int32), True
        else:
            k0, v0 = ctx.k, ctx.v
            _check_inner(k0, v0)
            k0s, v0s = (0, k0.stride(0), k0.stride(1)), (0, v0.stride(0), v0.stride(1))
            bt0, s_bt0, page0 = dummy_i, 0, 1
            cu0, len0 = _seq_meta(ctx, batch, dev)
            paged = False
        if cur is None:
            k1 = v1 = q
            k1s = v1s = (0, 0)
            cu1 = len1 = dummy_i
        else:
            k1, v1 = cur.k, cur.v
            _check_inner(k1, v1)
            k1s, v1s = (k1.stride(0), k1.stride(1)), (v1.stride(0), v1.stride(1))
            cu1, len1 = _seq_meta(cur, batch, dev)
        use_mask = visible_end is not None and last and cur is not None
        vis = visible_end.to(torch.int32) if use_mask else dummy_i
        st_in = (acc, m, l) if has_state else (dummy_i, dummy_i, dummy_i)
        if fin:
            acc_arg, m_arg, l_arg = st_in
        else:
            # The kernel reads the old state and writes the new one through the same pointers: give it a copy.
            if has_state:
                new_acc.copy_(acc); new_m.copy_(m); new_l.copy_(l)
            acc_arg, m_arg, l_arg = new_acc, new_m, new_l
        grid = (triton.cdiv(max(max_seqlen_q, 1), cfg["BLOCK_M"]), hq, batch)
        _attn_fwd[grid](
            q, q.stride(0), q.stride(1),
            k0, v0, *k0s, *v0s, bt0, s_bt0, page0, cu0, len0,
            k1, v1, *k1s, *v1s, cu1, len1,
            cu_q, vis, acc_arg, m_arg, l_arg,
            out if fin else q, (out.stride(0) if fin else 0), (out.stride(1) if fin else 0), lse if fin else m_arg,
            scale * LOG2E, g, off, d, hq,
            HAS_CTX=ctx is not None, CTX_PAGED=paged, HAS_CUR=cur is not None, HAS_MASK=use_mask,
            HAS_STATE=has_state, FINALIZE=fin,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=head_dim, DOT_PREC=prec,
            UPCAST=triton_interpreting() and q.dtype != torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
        if not fin:
            acc, m, l = new_acc, new_m, new_l
    if finalize:
        return AttentionOutput(out=out, lse=lse)
    return AttentionState(acc=acc, m=m, l=l, backend="triton")


def _check_inner(k: torch.Tensor, v: torch.Tensor) -> None:
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("K/V must have a contiguous head_dim (stride 1 on the last dim)")
