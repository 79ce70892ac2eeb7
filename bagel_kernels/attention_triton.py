"""Triton joint attention: GQA-native, segmented (paged context + current tokens), varlen, resumable.

One program = one (query block, query head, sequence). It walks segment 0 (the frozen context: paged through a
block table, or contiguous) and then segment 1 (the current tokens), each in fixed BLOCK_N blocks from the
segment's own start, carrying the fp32 online-softmax state (acc, m, l) in registers; ``state`` in/out moves the
same state through memory so that chunked launches equal one launch bit for bit. Tile shapes and warps are fixed
per (dtype, head_dim) — never chosen from the problem size — which is what makes the kernel batch-invariant.
More than two segments run as chained launches through the state.

Speed: the blocks of a segment that are full (every key real) run without masks — on the current tokens through
TMA descriptors when the storage allows — and only a segment's last, partial block pays for masking. Whether a block
is full depends only on its position in its segment, never on the query rows, heads or ranks in the launch, and the
two paths do the same arithmetic on a full block, so the split keeps the invariance guarantees.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._dispatch import triton_interpreting
from ._launch import LOG2E, TRITON_BLOCK_M, TRITON_BLOCK_N, _contiguous_meta, _dummy, _i32
from .attention_types import AttentionOutput, AttentionState, ContiguousKV, PagedKV

__all__ = ["attention_triton", "tile_config", "TRITON_BLOCK_M", "TRITON_BLOCK_N"]



def tile_config(dtype: torch.dtype, head_dim: int) -> dict:
    """Fixed launch configuration per (dtype, head_dim). Never depends on sequence lengths (exactness)."""
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=TRITON_BLOCK_N // 2, num_warps=4, num_stages=2)
    if head_dim > 128:
        return dict(BLOCK_M=TRITON_BLOCK_M, BLOCK_N=TRITON_BLOCK_N // 2, num_warps=8, num_stages=2)
    return dict(BLOCK_M=TRITON_BLOCK_M, BLOCK_N=TRITON_BLOCK_N, num_warps=8, num_stages=3)


@triton.jit
def _block_update(acc, m_i, l_i, q, k_t, v, valid, qk_scale,
                  MASKED: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    """One KV block of the online softmax. Scores stay unscaled until the exponent (scale folded into one FMA);
    max(s)·c == max(s·c) for c > 0, so m is the same number either way. A full block (MASKED=False) does exactly
    the arithmetic a masked block with every key valid does."""
    if UPCAST:  # Triton 3.6's interpreter mishandles 16-bit dot operands; fp32 holds their products exactly
        q = q.to(tl.float32)
        k_t = k_t.to(tl.float32)
    s = tl.dot(q, k_t, input_precision=DOT_PREC)  # (BM, BN), unscaled
    if MASKED:
        s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
    if MASKED:
        # A row that has seen no key keeps m = -inf: subtract 0 so exp2 gives 0 rather than NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new  # a full block gives every row a finite score
    p = tl.math.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    p = p.to(v.dtype)
    if UPCAST:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = tl.dot(p, v, acc, input_precision=DOT_PREC)  # accumulate in place (wgmma keeps acc in registers)
    return acc, m_new, l_i


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
    if MASK_ROWS and MASK_COLS:
        return tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    elif MASK_ROWS:
        return tl.load(ptrs, mask=rows_ok, other=0.0)
    elif MASK_COLS:
        return tl.load(ptrs, mask=cols_ok, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _contiguous_kv(K, V, s_kt, s_kh, s_vt, s_vh, base, j, ok, kvh, offs_d, d_ok, TAIL: tl.constexpr,
                   EVEN_D: tl.constexpr):
    """K^T (D, BN) and V (BN, D) of keys base + j of KV head kvh in contiguous (tokens, H_kv, D) storage; rows past
    the segment (``ok`` false) read as zeros in a TAIL block."""
    t = (base + j).to(tl.int64)
    k_t = _load_tile(K + t[None, :] * s_kt + kvh * s_kh + offs_d[:, None], ok[None, :], d_ok[:, None], TAIL,
                     not EVEN_D)
    v = _load_tile(V + t[:, None] * s_vt + kvh * s_vh + offs_d[None, :], ok[:, None], d_ok[None, :], TAIL,
                   not EVEN_D)
    return k_t, v


@triton.jit
def _ctx_block(acc, m_i, l_i, q, start, c_len, c_base, b, kvh, offs_n, offs_d, d_ok, qk_scale,
               K0, V0, s_k0b, s_k0t, s_k0h, s_v0b, s_v0t, s_v0h, BT0, s_bt0, PAGE0,
               CTX_PAGED: tl.constexpr, TAIL: tl.constexpr, EVEN_D: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
    j = start + offs_n
    ok = j < c_len
    if CTX_PAGED:
        if TAIL:
            page = tl.load(BT0 + b * s_bt0 + j // PAGE0, mask=ok, other=0).to(tl.int64)
        else:
            page = tl.load(BT0 + b * s_bt0 + j // PAGE0).to(tl.int64)
        slot = (j % PAGE0).to(tl.int64)
        kp = K0 + page[None, :] * s_k0b + slot[None, :] * s_k0t + kvh * s_k0h + offs_d[:, None]
        vp = V0 + page[:, None] * s_v0b + slot[:, None] * s_v0t + kvh * s_v0h + offs_d[None, :]
        k_t = _load_tile(kp, ok[None, :], d_ok[:, None], TAIL, not EVEN_D)
        v = _load_tile(vp, ok[:, None], d_ok[None, :], TAIL, not EVEN_D)
    else:
        k_t, v = _contiguous_kv(K0, V0, s_k0t, s_k0h, s_v0t, s_v0h, c_base, j, ok, kvh, offs_d, d_ok, TAIL, EVEN_D)
    return _block_update(acc, m_i, l_i, q, k_t, v, ok[None, :], qk_scale, TAIL, DOT_PREC, UPCAST)


@triton.jit
def _segment_extent(CU, LENS, LEN_S, b, HAS_CU: tl.constexpr, HAS_LENS: tl.constexpr):
    """(storage start, valid length) of sequence b in a contiguous segment: cu_seqlens and seqlens when given,
    lengths from cu differences, else one sequence of the scalar length."""
    base = 0
    if HAS_CU:
        base = tl.load(CU + b)
    if HAS_LENS:
        n = tl.load(LENS + b)
    elif HAS_CU:
        n = tl.load(CU + b + 1) - base
    else:
        n = LEN_S
    return base, n


@triton.jit(do_not_specialize=["Q_LEN", "LEN0_S", "LEN1_S"])
def _attn_fwd(
    Q, s_qt, s_qh,
    K0, V0, s_k0b, s_k0t, s_k0h, s_v0b, s_v0t, s_v0h, BT0, s_bt0, PAGE0, CU0, LEN0, LEN0_S,
    K1, V1, K1D, V1D, s_k1t, s_k1h, s_v1t, s_v1h, CU1, LEN1, LEN1_S,
    CU_Q, Q_LEN, VIS, ACC, M, L, OUT, s_ot, s_oh, LSE,
    qk_scale, G, HEAD_OFF, D, HQ,
    HAS_CTX: tl.constexpr, CTX_PAGED: tl.constexpr, CTX_CU: tl.constexpr, CTX_LENS: tl.constexpr,
    HAS_CUR: tl.constexpr, CUR_CU: tl.constexpr, CUR_LENS: tl.constexpr, CUR_TMA: tl.constexpr,
    Q_CU: tl.constexpr,
    HAS_MASK: tl.constexpr, HAS_STATE: tl.constexpr, FINALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, EVEN_D: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if Q_CU:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        q_len = Q_LEN
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
        c_base, c_len = _segment_extent(CU0, LEN0, LEN0_S, b, CTX_CU, CTX_LENS)
        c_full = (c_len // BLOCK_N) * BLOCK_N
        for start in range(0, c_full, BLOCK_N):
            acc, m_i, l_i = _ctx_block(acc, m_i, l_i, q, start, c_len, c_base, b, kvh, offs_n, offs_d, d_ok,
                                       qk_scale, K0, V0, s_k0b, s_k0t, s_k0h, s_v0b, s_v0t, s_v0h, BT0, s_bt0,
                                       PAGE0, CTX_PAGED, False, EVEN_D, DOT_PREC, UPCAST)
        if c_full < c_len:
            acc, m_i, l_i = _ctx_block(acc, m_i, l_i, q, c_full, c_len, c_base, b, kvh, offs_n, offs_d, d_ok,
                                       qk_scale, K0, V0, s_k0b, s_k0t, s_k0h, s_v0b, s_v0t, s_v0h, BT0, s_bt0,
                                       PAGE0, CTX_PAGED, True, EVEN_D, DOT_PREC, UPCAST)

    # ---- segment 1: the current tokens, contiguous, optionally masked by visible_end ----
    if HAS_CUR:
        g_base, g_len = _segment_extent(CU1, LEN1, LEN1_S, b, CUR_CU, CUR_LENS)
        if HAS_MASK:
            vis = tl.load(VIS + rows, mask=row_ok, other=0)
            # Blocks past every row's bound are fully masked: skipping them is bit-identical (they add exact 0).
            # Every visited block takes the masked path: which blocks are full here depends on the rows in the tile.
            hi = tl.minimum(g_len, tl.max(vis, 0))
            g_full = 0
        else:
            hi = g_len
            g_full = (g_len // BLOCK_N) * BLOCK_N
        col = kvh * HEAD_DIM
        for start in range(0, g_full, BLOCK_N):
            if CUR_TMA:
                k_t = K1D.load([g_base + start, col]).T
                v = V1D.load([g_base + start, col])
            else:
                j = start + offs_n  # a full block: every key valid, no row mask
                k_t, v = _contiguous_kv(K1, V1, s_k1t, s_k1h, s_v1t, s_v1h, g_base, j, j < g_len, kvh, offs_d, d_ok,
                                        False, EVEN_D)
            acc, m_i, l_i = _block_update(acc, m_i, l_i, q, k_t, v, None, qk_scale, False, DOT_PREC, UPCAST)
        for start in range(g_full, hi, BLOCK_N):  # the partial tail (or every block under the prefill mask)
            j = start + offs_n
            ok = j < g_len
            k_t, v = _contiguous_kv(K1, V1, s_k1t, s_k1h, s_v1t, s_v1h, g_base, j, ok, kvh, offs_d, d_ok, True, EVEN_D)
            valid = ok[None, :]
            if HAS_MASK:
                valid = valid & (j[None, :] < vis[:, None])
            acc, m_i, l_i = _block_update(acc, m_i, l_i, q, k_t, v, valid, qk_scale, True, DOT_PREC, UPCAST)

    if FINALIZE:
        # l == 0 exactly iff the row saw no key (finite inputs give l >= 0, so this equals l > 0 bit for bit);
        # a NaN l (NaN query, key or value) counts as seen and surfaces as NaN, as SDPA gives, never as 0.
        seen = l_i != 0
        l_safe = tl.where(seen, l_i, 1.0)
        o = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
        tl.store(OUT + rows[:, None] * s_ot + h * s_oh + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=tile_ok)
        lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        tl.store(LSE + st_rows, lse, mask=row_ok)
    else:
        tl.store(ACC + st_rows[:, None] * D + offs_d[None, :], acc, mask=tile_ok)
        tl.store(M + st_rows, m_i, mask=row_ok)
        tl.store(L + st_rows, l_i, mask=row_ok)


def _tma_mode(seg: ContiguousKV, head_dim: int) -> bool:
    """Whether the current tokens' full blocks are read through TMA descriptors over the (tokens, H_kv·D) rows;
    pointers otherwise (head_dim padded, heads not adjacent, misaligned storage). Both read the same numbers."""
    k, v = seg.k, seg.v
    if k.shape[2] != head_dim or k.shape[0] == 0:
        return False
    return all(x.stride(1) == head_dim and (x.stride(0) * x.element_size()) % 16 == 0 and x.data_ptr() % 16 == 0
               for x in (k, v))


def _host_descriptors(seg: ContiguousKV, block_n: int, head_dim: int):
    t, hkv, d = seg.k.shape
    return [TensorDescriptor(x, [t, hkv * d], [x.stride(0), 1], [block_n, head_dim]) for x in (seg.k, seg.v)]


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
    dummy = _dummy(dev)
    batch = 1 if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    cu_q = dummy if cu_seqlens_q is None else _i32(cu_seqlens_q)
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
        paged = ctx_cu = ctx_lens = False
        len0_s = 0
        if ctx is None:
            k0 = v0 = q
            k0s = v0s = (0, 0, 0)
            bt0, s_bt0, page0, cu0, len0 = dummy, 0, 1, dummy, dummy
        elif isinstance(ctx, PagedKV):
            k0, v0 = ctx.k, ctx.v
            _check_inner(k0, v0)
            k0s, v0s = (k0.stride(0), k0.stride(1), k0.stride(2)), (v0.stride(0), v0.stride(1), v0.stride(2))
            bt0, s_bt0, page0 = _i32(ctx.block_table), ctx.block_table.stride(0), ctx.block_size
            cu0, len0, paged, ctx_lens = dummy, _i32(ctx.seqlens), True, True
        else:
            k0, v0 = ctx.k, ctx.v
            _check_inner(k0, v0)
            k0s, v0s = (0, k0.stride(0), k0.stride(1)), (0, v0.stride(0), v0.stride(1))
            bt0, s_bt0, page0 = dummy, 0, 1
            cu0, ctx_cu, len0, ctx_lens, len0_s = _contiguous_meta(ctx, dummy)
        tma = False
        if cur is None:
            k1 = v1 = q
            k1s = v1s = (0, 0)
            cu1 = len1 = dummy
            cur_cu = cur_lens = False
            len1_s = 0
        else:
            k1, v1 = cur.k, cur.v
            _check_inner(k1, v1)
            k1s, v1s = (k1.stride(0), k1.stride(1)), (v1.stride(0), v1.stride(1))
            cu1, cur_cu, len1, cur_lens, len1_s = _contiguous_meta(cur, dummy)
            tma = _tma_mode(cur, head_dim)
        k1d, v1d = _host_descriptors(cur, cfg["BLOCK_N"], head_dim) if tma else (k1, v1)
        use_mask = visible_end is not None and last and cur is not None
        vis = _i32(visible_end) if use_mask else dummy
        st_in = (acc, m, l) if has_state else (dummy, dummy, dummy)
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
            k0, v0, *k0s, *v0s, bt0, s_bt0, page0, cu0, len0, len0_s,
            k1, v1, k1d, v1d, *k1s, *v1s, cu1, len1, len1_s,
            cu_q, tq, vis, acc_arg, m_arg, l_arg,
            out if fin else q, (out.stride(0) if fin else 0), (out.stride(1) if fin else 0), lse if fin else m_arg,
            scale * LOG2E, g, off, d, hq,
            HAS_CTX=ctx is not None, CTX_PAGED=paged, CTX_CU=ctx_cu, CTX_LENS=ctx_lens,
            HAS_CUR=cur is not None, CUR_CU=cur_cu, CUR_LENS=cur_lens, CUR_TMA=tma,
            Q_CU=cu_seqlens_q is not None, HAS_MASK=use_mask, HAS_STATE=has_state, FINALIZE=fin,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEAD_DIM=head_dim, EVEN_D=head_dim == d, DOT_PREC=prec,
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
