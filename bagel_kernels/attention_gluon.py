"""Hopper warp-specialized joint attention in Gluon: the Triton kernel's arithmetic, scheduled like FA3.

Why a second implementation: in the Triton kernel (``attention_triton``) one CTA of 8 warps runs each KV block as one
lock-stepped sequence — wait for the copy, QK^T wgmma, softmax, P·V wgmma — so the tensor cores idle during the
softmax, which leaves it short of cuDNN (numbers: benchmarks/RESULTS.md). Here one producer warp streams Q, K and V by
TMA into a ring of shared-memory stages (separate K and V barriers, so QK^T starts before V has landed) and two
consumer warpgroups each own 64 of the tile's 128 query rows. The consumers are independent partitions with no
CTA-wide barrier between them, so one warpgroup's softmax runs while the other's wgmma keeps the tensor cores busy;
inside a warpgroup QK^T of block i is issued before P·V of block i-1, so its own softmax also runs under a wgmma
(FA3's intra-warpgroup overlap). A segment's partial last block runs on the first 16 rows of the stage when it has at
most 16 real keys (the 2-key remainder of 4098 or 1026 current tokens) and on half the stage when it has at most 64:
less wgmma and softmax work, same bits (see ``_partial_block``). A sequence's last query tile with at most 8 rows
(4098 and 1026 queries end on 2) is packed across the GQA group: one CTA holds those rows of all 7 heads that share a
KV head, instead of 7 CTAs that each run the whole key stream for 2 rows (``_packed_rows``; it matters most where the
key stream is short, e.g. 512²).

Exactness: a query row's arithmetic is the Triton kernel's, step for step — the same fixed BLOCK_N = 128 key blocks
from each segment's own start, segment 0 (context) then segment 1 (current tokens), m64n128k16 wgmma in K order with
fp32 accumulation, the same register layout of the scores (so the same row-reduction order), the same exponent FMA,
the same rescaling and roundings. The GPU tests check the output and LSE are bitwise the Triton kernel's, which is
what lets the dispatcher pick either kernel without breaking the parallel-equals-single-device contract.
Fixed for that, never chosen from the problem: BLOCK_N = 128 keys (= the Triton kernel's), the segment order, the
wgmma instruction (m64n128k16, 16 rows per warp); which CTA or warpgroup computes a row, and which rows (of which
heads) share its tile, does not enter its arithmetic.

Keys past a segment's end inside a block are masked to -inf as in the Triton kernel. TMA reads whatever storage
lies there (the next sequence, padding, an unwritten cache slot); p is exactly 0 for those keys, but 0 * NaN is not
0, so when such rows are inside the storage (not TMA zero-fill) each consumer warpgroup zeroes them in the V stage
before its P·V — the Triton kernel's masked loads give the same zeros.

Used for the common launch only (see ``gluon_attention_supported``): 16-bit inputs, head_dim 128, no prefill mask,
no resumable state, at most one context segment (contiguous or paged with TMA-friendly pages) plus the current
tokens. Everything else stays on the Triton kernel.
"""
import functools

import torch
import triton

from ._gluon_common import _HAVE_GLUON
from ._launch import LOG2E, TRITON_BLOCK_M, TRITON_BLOCK_N, _contiguous_meta, _dummy, _i32
from .attention_types import AttentionOutput, ContiguousKV, PagedKV

if _HAVE_GLUON:  # Gluon ships with Triton >= 3.5; the project pins 3.6 (CPU CI imports this module, never launches it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    from ._gluon_common import SCALAR, aggregate, field, phase

BLOCK_M = TRITON_BLOCK_M  # query rows per CTA (128)
WG_M = BLOCK_M // 2  # rows per consumer warpgroup
BLOCK_N = TRITON_BLOCK_N  # keys per block: the Triton kernel's fixed BLOCK_N (exactness)
HEAD_DIM = 128
STAGES = 3  # Q (32 KiB) + 3 x (K 32 KiB + V 32 KiB) = 224 KiB of the 227 KiB
MAXNREG = 168  # 65536 registers / (3 warpgroups x 128 threads)
PRODUCER_REGS = 56  # the producer warp's share; the consumer warpgroups get the rest
# How the key blocks are pipelined; every schedule gives the same bits, only the issue order differs.
# "segment": each segment its own software pipeline, its short last block run after it drains. "chained": one
# pipeline through both segments, short blocks (16/64/128 keys wide) included as links, so it never drains before
# the end. "auto" (the default) chains where the context has at least one full block (there the drain it avoids
# costs more than the chain's bookkeeping) and keeps "segment" for short or absent contexts (there the context is
# all partial block and chaining only adds links). ``KernelOptions.attention_schedule`` overrides it.
SCHEDULES = {"segment": 0, "chained": 1}


def _schedule(ctx, name: str = "auto") -> int:
    if name == "auto":
        # the host's bound on the context length (no device sync): it picks an issue order, never a number
        name = "chained" if ctx is not None and ctx.span >= BLOCK_N else "segment"
    if name not in SCHEDULES:
        raise ValueError(f"attention schedule {name!r}: expected 'auto' or one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]


if _HAVE_GLUON:
    # setmaxnreg budget: the launch's MAXNREG per thread over 3 warpgroups, minus the producer's, split between the
    # two consumer warpgroups (multiples of 8).
    _PRODUCER_REGS = gl.constexpr(PRODUCER_REGS)
    _CONSUMER_REGS = gl.constexpr((MAXNREG * 3 - PRODUCER_REGS) // 2 // 8 * 8)

    @aggregate
    class KVRing:
        """The ring of K and V stages in shared memory and their mbarriers. Ring slot i (key block i of the tile's
        stream: the context's blocks, then the current tokens') lives in stage i % NS. A stage's "ready" barrier
        completes when its TMA copy has landed, its "empty" barrier when both consumer warpgroups have released it.
        K and V have separate barriers, so QK^T of a block starts before its V has landed."""
        k_bufs: gl.shared_memory_descriptor
        v_bufs: gl.shared_memory_descriptor
        kready: gl.shared_memory_descriptor
        kempty: gl.shared_memory_descriptor
        vready: gl.shared_memory_descriptor
        vempty: gl.shared_memory_descriptor

        @gluon.constexpr_function
        def __init__(self, k_bufs, v_bufs, kready, kempty, vready, vempty):
            self.k_bufs = k_bufs
            self.v_bufs = v_bufs
            self.kready = kready
            self.kempty = kempty
            self.vready = vready
            self.vempty = vempty

        @gluon.jit
        def wait_k(self, i):
            """Consumer: wait until slot i's K has landed."""
            NS: gl.constexpr = self.k_bufs.shape[0]
            mbarrier.wait(self.kready.index(i % NS), phase(i, NS))

        @gluon.jit
        def wait_v(self, i):
            """Consumer: wait until slot i's V has landed."""
            NS: gl.constexpr = self.v_bufs.shape[0]
            mbarrier.wait(self.vready.index(i % NS), phase(i, NS))

        @gluon.jit
        def release_k(self, i):
            """Consumer: this warpgroup has read slot i's K."""
            NS: gl.constexpr = self.k_bufs.shape[0]
            mbarrier.arrive(self.kempty.index(i % NS), count=1)

        @gluon.jit
        def release_v(self, i):
            """Consumer: this warpgroup has read slot i's V."""
            NS: gl.constexpr = self.v_bufs.shape[0]
            mbarrier.arrive(self.vempty.index(i % NS), count=1)

        @gluon.jit
        def k(self, i):
            NS: gl.constexpr = self.k_bufs.shape[0]
            return self.k_bufs.index(i % NS)

        @gluon.jit
        def v(self, i):
            NS: gl.constexpr = self.v_bufs.shape[0]
            return self.v_bufs.index(i % NS)

    @aggregate
    class KVSource:
        """Where the tile's key blocks are read from by TMA: segment 0 (the context; contiguous rows, or pages
        through the block table BT0: page p of KV head h starts at TMA row p * R0 + h * RH0, column h * CH0; ROWS0
        rows in all), then segment 1 (the current tokens' contiguous rows)."""
        k0_desc: tma.tensor_descriptor
        v0_desc: tma.tensor_descriptor
        k1_desc: tma.tensor_descriptor
        v1_desc: tma.tensor_descriptor
        BT0: SCALAR
        s_bt0: SCALAR
        PAGE0: SCALAR
        R0: SCALAR
        RH0: SCALAR
        CH0: SCALAR
        ROWS0: SCALAR
        HAS_CTX: gl.constexpr
        CTX_PAGED: gl.constexpr
        HAS_CUR: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, k0_desc, v0_desc, k1_desc, v1_desc, BT0, s_bt0, PAGE0, R0, RH0, CH0, ROWS0, HAS_CTX,
                     CTX_PAGED, HAS_CUR):
            self.k0_desc = k0_desc
            self.v0_desc = v0_desc
            self.k1_desc = k1_desc
            self.v1_desc = v1_desc
            self.BT0 = field(BT0)
            self.s_bt0 = field(s_bt0)
            self.PAGE0 = field(PAGE0)
            self.R0 = field(R0)
            self.RH0 = field(RH0)
            self.CH0 = field(CH0)
            self.ROWS0 = field(ROWS0)
            self.HAS_CTX = gl.constexpr(HAS_CTX)
            self.CTX_PAGED = gl.constexpr(CTX_PAGED)
            self.HAS_CUR = gl.constexpr(HAS_CUR)

    @aggregate
    class Tile:
        """What one CTA computes: query rows [q_row, q_row + BLOCK_M) of head h (rows_left of them real; a packed
        last tile of pack_r rows per head holds PACK_G heads, see ``_packed_rows``), which read KV head kvh of
        sequence b — the context's c_len keys from row c_base, then the current tokens' g_len keys from row
        g_base. c_dirty / g_dirty: a segment's partial last block reads rows past the segment from inside the
        storage (not TMA zero-fill), so V is fixed up. o_tma_ok: this sequence ends the storage, so a TMA store's
        clipping is the row mask."""
        q_row: SCALAR
        rows_left: SCALAR
        pack_r: SCALAR
        h: SCALAR
        kvh: SCALAR
        b: SCALAR
        c_base: SCALAR
        c_len: SCALAR
        g_base: SCALAR
        g_len: SCALAR
        c_dirty: SCALAR
        g_dirty: SCALAR
        o_tma_ok: SCALAR
        PACK_G: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, q_row, rows_left, pack_r, h, kvh, b, c_base, c_len, g_base, g_len, c_dirty, g_dirty,
                     o_tma_ok, PACK_G):
            self.q_row = field(q_row)
            self.rows_left = field(rows_left)
            self.pack_r = field(pack_r)
            self.h = field(h)
            self.kvh = field(kvh)
            self.b = field(b)
            self.c_base = field(c_base)
            self.c_len = field(c_len)
            self.g_base = field(g_base)
            self.g_len = field(g_len)
            self.c_dirty = field(c_dirty)
            self.g_dirty = field(g_dirty)
            self.o_tma_ok = field(o_tma_ok)
            self.PACK_G = gl.constexpr(PACK_G)

    @aggregate
    class Output:
        """Where a tile's rows go: the (tokens, HQ, D) output (by TMA through o_desc, or row-masked stores) and the
        (tokens, HQ) LSE."""
        o_desc: tma.tensor_descriptor
        OUT: gl.tensor
        s_ot: SCALAR
        s_oh: SCALAR
        LSE: gl.tensor
        HQ: SCALAR

        @gluon.constexpr_function
        def __init__(self, o_desc, OUT, s_ot, s_oh, LSE, HQ):
            self.o_desc = o_desc
            self.OUT = OUT
            self.s_ot = field(s_ot)
            self.s_oh = field(s_oh)
            self.LSE = LSE
            self.HQ = field(HQ)

    @gluon.jit
    def _extent(CU, LENS, LEN_S, b, HAS_CU: gl.constexpr, HAS_LENS: gl.constexpr):
        """(storage start, valid length) of sequence b in a contiguous segment (as the Triton kernel reads it)."""
        base = 0
        if HAS_CU:
            base = gl.load(CU + b)
        if HAS_LENS:
            n = gl.load(LENS + b)
        elif HAS_CU:
            n = gl.load(CU + b + 1) - base
        else:
            n = LEN_S
        return base, n

    @gluon.constexpr_function
    def _rows_layout(cols, num_warps):
        """Coalesced 16-byte-per-thread layout for (rows, cols) chunks of a tile in shared memory."""
        tpw_n = min(32, cols // 8)
        return gl.BlockedLayout([1, 8], [32 // tpw_n, tpw_n], [num_warps, 1], [1, 0])

    @gluon.jit
    def _zero_rows_from(v_buf, n_valid):
        """V rows >= n_valid of a landed stage (or its first half) become 0, before this warpgroup's P·V: they are
        keys past the segment that TMA read from inside the storage (the next sequence, padding, unwritten cache
        slots) — p is exactly 0 there, but 0 * NaN is not. Both warpgroups zero the same rows of the shared stage
        (same values: a benign overlap), each before its own wgmma, so neither waits for the other and the producer
        never waits for its own copy. The Triton kernel's masked loads read the same zeros."""
        NR: gl.constexpr = v_buf.shape[0]
        HD: gl.constexpr = v_buf.shape[1]
        CH: gl.constexpr = 16
        layout: gl.constexpr = _rows_layout(HD, 4)
        rows = gl.arange(0, CH, layout=gl.SliceLayout(1, layout))
        for r in gl.static_range(0, NR, CH):
            if r + CH > n_valid:
                part = v_buf.slice(r, CH, dim=0)
                x = part.load(layout)
                part.store(gl.where((r + rows)[:, None] < n_valid, x, gl.zeros_like(x)))
        fence_async_shared()  # generic-proxy stores, read next by wgmma (async proxy)
        gl.thread_barrier()  # every thread of the warpgroup has written before its wgmma reads

    @gluon.jit
    def _page_rows(src, tile, start, in_ctx, NPB: gl.constexpr, PB: gl.constexpr):
        """TMA rows of the NPB pages of one context block, read from the block table in one vector load (shared by
        the block's K and V copies). Pages past the sequence get an out-of-bounds row, i.e. TMA zero-fill, and
        their block-table entries are never read."""
        layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
        idx = gl.arange(0, NPB, layout=layout)
        j = start + idx * PB
        ok = (j < tile.c_len) & in_ctx
        page = gl.load(src.BT0 + tile.b * src.s_bt0 + j // src.PAGE0, mask=ok, other=0)
        return gl.where(ok, page * src.R0 + tile.kvh * src.RH0 + j % src.PAGE0, src.ROWS0), idx

    @gluon.jit
    def _issue_block(desc0, desc1, src, tile, i, nb0, start, page_rows, page_idx, bar, dst):
        """TMA copies of one K (or V: ``desc0``/``desc1`` are that tensor's context and current descriptors) block
        into ``dst``, completing on ``bar``."""
        HD: gl.constexpr = dst.shape[1]
        if src.HAS_CTX:
            if i < nb0:
                if src.CTX_PAGED:  # one copy per page: the page's rows of this KV head
                    PB: gl.constexpr = desc0.block_type.shape[0]
                    for p in gl.static_range(dst.shape[0] // PB):
                        row = gl.sum(gl.where(page_idx == p, page_rows, 0), axis=0)
                        tma.async_copy_global_to_shared(desc0, [row, tile.kvh * src.CH0], bar,
                                                        dst.slice(p * PB, PB, dim=0))
                else:
                    tma.async_copy_global_to_shared(desc0, [tile.c_base + start, tile.kvh * HD], bar, dst)
        if src.HAS_CUR:
            if i >= nb0:
                tma.async_copy_global_to_shared(desc1, [tile.g_base + start, tile.kvh * HD], bar, dst)

    @gluon.jit
    def _producer(q_desc, q8_desc, src, tile, q_col, q_smem, q_bar, ring):
        """The producer warp: Q once, then every key block's K and V by TMA into the ring, in the consumers'
        order (context blocks, then current blocks), each copy issued as soon as its stage is free."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        NS: gl.constexpr = ring.k_bufs.shape[0]
        WM: gl.constexpr = q_smem.shape[1]
        KV_BYTES: gl.constexpr = src.k1_desc.block_type.nbytes  # a whole (BLOCK_N, D) block, paged or not
        PB: gl.constexpr = src.k0_desc.block_type.shape[0]  # rows per context copy (a page, for a paged context)
        HD: gl.constexpr = ring.k_bufs.shape[2]
        PACK_G: gl.constexpr = tile.PACK_G
        if tile.pack_r > 0:  # a packed last tile: 8 token rows of each of the group's PACK_G heads (see _packed_rows)
            mbarrier.expect(q_bar, PACK_G * q8_desc.block_type.nbytes)
            for j in gl.static_range(PACK_G):
                tma.async_copy_global_to_shared(q8_desc, [tile.q_row, q_col + j * HD], q_bar,
                                                q_smem.index(0).slice(8 * j, 8, dim=0))
        else:
            mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [tile.q_row, q_col], q_bar, q_smem.index(0))
            tma.async_copy_global_to_shared(q_desc, [tile.q_row + WM, q_col], q_bar, q_smem.index(1))
        nb0 = gl.cdiv(tile.c_len, NB)
        nblocks = nb0 + gl.cdiv(tile.g_len, NB)
        for i in range(nblocks):
            s = i % NS
            ph = phase(i, NS)
            in_ctx = i < nb0
            start = gl.where(in_ctx, i, i - nb0) * NB
            if src.CTX_PAGED:
                page_rows, page_idx = _page_rows(src, tile, start, in_ctx, NB // PB, PB)
            else:
                page_rows = 0
                page_idx = 0
            mbarrier.wait(ring.kempty.index(s), ph ^ 1)
            mbarrier.expect(ring.kready.index(s), KV_BYTES)
            _issue_block(src.k0_desc, src.k1_desc, src, tile, i, nb0, start, page_rows, page_idx,
                         ring.kready.index(s), ring.k_bufs.index(s))
            mbarrier.wait(ring.vempty.index(s), ph ^ 1)
            mbarrier.expect(ring.vready.index(s), KV_BYTES)
            _issue_block(src.v0_desc, src.v1_desc, src, tile, i, nb0, start, page_rows, page_idx,
                         ring.vready.index(s), ring.v_bufs.index(s))

    @gluon.jit
    def _softmax_step(sc, m_i, l_i, qk_scale):
        """The Triton kernel's online-softmax update for one block, same operations in the same order:
        returns (m, l, alpha, p); the caller rescales acc by alpha and adds p·V."""
        m_new = gl.maximum(m_i, gl.max(sc, 1) * qk_scale)  # log2 units; scale folded into the exponent FMA
        # A row that has seen no key keeps m = -inf: subtract 0 so exp2 gives 0 rather than NaN (a no-op for a
        # full block, whose scores are finite: the Triton kernel skips it there, same numbers).
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(sc * qk_scale - m_use[:, None])
        alpha = gl.exp2(m_i - m_use)
        l_i = l_i * alpha + gl.sum(p, 1)
        return m_new, l_i, alpha, p

    @gluon.jit
    def _scores(q, k, ring, i, zero_s):
        """S = Q K^T of ring slot i's landed K (``k``: its stage, or its first keys), unscaled; the K stage is
        released as soon as the wgmma has read it."""
        ring.wait_k(i)
        sc = warpgroup_mma(q, k.permute((1, 0)), zero_s, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=0, deps=(sc, ))
        ring.release_k(i)
        return sc

    @gluon.jit
    def _full_blocks(q, ring, first, count, acc, m_i, l_i, qk_scale):
        """``count`` full key blocks (ring slots first .., no masks) into the running state (acc, m, l)."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        WM: gl.constexpr = q.shape[0]
        dtype: gl.constexpr = ring.k_bufs.dtype
        mma: gl.constexpr = acc.type.layout
        p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        zero_s = gl.zeros([WM, NB], gl.float32, layout=mma)
        if count > 0:
            # Software pipeline (FA3's intra-warpgroup overlap): QK^T of block i is issued before P·V of block
            # i-1, and block i's softmax runs while that P·V is still on the tensor cores. Each row still sees
            # acc = acc * alpha_i + P_i V_i in block order: the numbers of a plain loop.
            sc = _scores(q, ring.k(first), ring, first, zero_s)
            m_i, l_i, alpha, p = _softmax_step(sc, m_i, l_i, qk_scale)
            acc = acc * alpha[:, None]
            p16 = gl.convert_layout(p.to(dtype), p_op)
            for i in range(first + 1, first + count):
                ring.wait_k(i)
                sc = warpgroup_mma(q, ring.k(i).permute((1, 0)), zero_s, is_async=True)
                ring.wait_v(i - 1)
                acc = warpgroup_mma(p16, ring.v(i - 1), acc, is_async=True)
                sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc, ))  # groups retire in order: QK^T is done
                ring.release_k(i)
                m_i, l_i, alpha, p = _softmax_step(sc, m_i, l_i, qk_scale)
                acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
                ring.release_v(i - 1)
                acc = acc * alpha[:, None]
                p16 = gl.convert_layout(p.to(dtype), p_op)
            last = first + count - 1
            ring.wait_v(last)
            acc = warpgroup_mma(p16, ring.v(last), acc, is_async=True)
            acc, p16 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p16))
            ring.release_v(last)
        return acc, m_i, l_i

    @gluon.jit
    def _partial_block(q, ring, slot, n_valid, dirty, acc, m_i, l_i, qk_scale, KN: gl.constexpr):
        """A segment's last block with ``n_valid`` < BLOCK_N real keys, on the first KN rows of the stage: KN = 16
        when n_valid <= 16, 64 when n_valid <= 64 (an eighth / half of the wgmma and softmax work), else the whole
        block. Same numbers either way: the keys a shorter block leaves out score -inf in the whole block, so they
        add exact zeros to every max, sum and product of that row (the Triton kernel runs the whole masked block)."""
        # a one-link chain: its QK^T and softmax, then its P·V
        acc, m_i, l_i, p16 = _chain_start(q, ring, slot, n_valid, m_i, l_i, acc, qk_scale, KN)
        acc = _chain_end(ring, slot, p16, n_valid, dirty, acc)
        return acc, m_i, l_i

    @gluon.jit
    def _segment(q, ring, first, seg_len, dirty, acc, m_i, l_i, qk_scale):
        """One segment from its own start: its full blocks, then its partial last block. Returns the state and the
        next ring slot."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        n_full = seg_len // NB
        tail = seg_len - n_full * NB
        acc, m_i, l_i = _full_blocks(q, ring, first, n_full, acc, m_i, l_i, qk_scale)
        slot = first + n_full
        if tail > 0:
            if tail <= 16:  # e.g. the 2-key remainder of 4098 or 1026 current tokens
                acc, m_i, l_i = _partial_block(q, ring, slot, tail, dirty, acc, m_i, l_i, qk_scale, 16)
            elif tail <= NB // 2:
                acc, m_i, l_i = _partial_block(q, ring, slot, tail, dirty, acc, m_i, l_i, qk_scale, NB // 2)
            else:
                acc, m_i, l_i = _partial_block(q, ring, slot, tail, dirty, acc, m_i, l_i, qk_scale, NB)
            slot += 1
        return acc, m_i, l_i, slot

    @gluon.constexpr_function
    def _kn_layout(KN):
        """Scores layout of a KN-key block: one warpgroup, 16 rows per warp, instruction N = KN."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, KN, 16])

    @gluon.jit
    def _masked_softmax(sc, n_valid, m_i, l_i, qk_scale, dtype: gl.constexpr, mma: gl.constexpr):
        """Mask keys >= n_valid of a (WM, KN) score block, run the online-softmax step in the block's own layout:
        (m, l, alpha) in the accumulator's row layout, and P as the P·V operand."""
        KN: gl.constexpr = sc.shape[1]
        if n_valid < KN:
            offs = gl.arange(0, KN, layout=gl.SliceLayout(0, sc.type.layout))
            sc = gl.where((offs < n_valid)[None, :], sc, float("-inf"))
        row_k: gl.constexpr = gl.SliceLayout(1, sc.type.layout)
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        m_new, l_new, alpha, p = _softmax_step(sc, gl.convert_layout(m_i, row_k), gl.convert_layout(l_i, row_k),
                                               qk_scale)
        p16 = gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2))
        return (gl.convert_layout(m_new, row_l), gl.convert_layout(l_new, row_l), gl.convert_layout(alpha, row_l),
                p16)

    @gluon.jit
    def _chain_start(q, ring, i, n_valid, m_i, l_i, acc, qk_scale, KN: gl.constexpr):
        """The chain's first link: QK^T of ring slot i (first KN keys of its stage) and its softmax; its P·V is
        left pending. Returns (acc rescaled, m, l, P)."""
        WM: gl.constexpr = q.shape[0]
        dtype: gl.constexpr = ring.k_bufs.dtype
        mma: gl.constexpr = acc.type.layout
        sc = _scores(q, ring.k(i).slice(0, KN, dim=0), ring, i, gl.zeros([WM, KN], gl.float32, layout=_kn_layout(KN)))
        m_i, l_i, alpha, p16 = _masked_softmax(sc, n_valid, m_i, l_i, qk_scale, dtype, mma)
        return acc * alpha[:, None], m_i, l_i, p16

    @gluon.jit
    def _chain_step(q, ring, i, n_valid, p_prev, n_prev, dirty_prev, acc, m_i, l_i, qk_scale, KN: gl.constexpr):
        """One link of the chained pipeline: QK^T of ring slot i (KN keys) is issued before P·V of slot i-1
        (``p_prev``, as many keys as its width), so slot i's softmax runs under that P·V. The widths may
        differ: this is how a segment's short last block joins the pipeline instead of draining it."""
        WM: gl.constexpr = q.shape[0]
        KP: gl.constexpr = p_prev.shape[1]
        dtype: gl.constexpr = ring.k_bufs.dtype
        mma: gl.constexpr = acc.type.layout
        ring.wait_k(i)
        sc = warpgroup_mma(q, ring.k(i).slice(0, KN, dim=0).permute((1, 0)),
                           gl.zeros([WM, KN], gl.float32, layout=_kn_layout(KN)), is_async=True)
        ring.wait_v(i - 1)
        v = ring.v(i - 1).slice(0, KP, dim=0)
        if dirty_prev & (n_prev < KP):
            _zero_rows_from(v, n_prev)
        acc = warpgroup_mma(p_prev, v, acc, is_async=True)
        sc = warpgroup_mma_wait(num_outstanding=1, deps=(sc, ))  # groups retire in order: QK^T is done
        ring.release_k(i)
        m_i, l_i, alpha, p16 = _masked_softmax(sc, n_valid, m_i, l_i, qk_scale, dtype, mma)
        acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
        ring.release_v(i - 1)
        return acc * alpha[:, None], m_i, l_i, p16

    @gluon.jit
    def _chain_end(ring, i, p_prev, n_prev, dirty_prev, acc):
        """The last P·V of the chain (ring slot i, ``p_prev``'s width)."""
        KP: gl.constexpr = p_prev.shape[1]
        ring.wait_v(i)
        v = ring.v(i).slice(0, KP, dim=0)
        if dirty_prev & (n_prev < KP):
            _zero_rows_from(v, n_prev)
        acc = warpgroup_mma(p_prev, v, acc, is_async=True)
        acc, p_prev = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_prev))
        ring.release_v(i)
        return acc

    @gluon.jit
    def _chain_full(q, ring, first, count, p16, acc, m_i, l_i, qk_scale):
        """Full blocks first..first+count-1 chained after a pending P (no masks, nothing dirty)."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        for i in range(first, first + count):
            acc, m_i, l_i, p16 = _chain_step(q, ring, i, NB, p16, NB, False, acc, m_i, l_i, qk_scale, NB)
        return acc, m_i, l_i, p16

    @gluon.jit
    def _chained(q, ring, tile, acc, m_i, l_i, qk_scale):
        """Both segments as ONE software pipeline, each segment's short last block (16, 64 or 128 keys wide)
        included as a link: the pipeline never drains at the context/current boundary or before the last block.
        Needs at least one full current block (the caller checks). Same numbers as ``_segment``: every block's
        keys, width, mask and update are the same, only the issue order of independent wgmmas differs."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        c_len = tile.c_len
        c_dirty = tile.c_dirty
        g_dirty = tile.g_dirty
        nc_full = c_len // NB
        c_tail = c_len - nc_full * NB
        nb0 = nc_full + (c_tail > 0).to(gl.int32)
        ng_full = tile.g_len // NB
        g_tail = tile.g_len - ng_full * NB
        # 1. the context, ending with the first current block's softmax done and its P·V pending (width NB)
        if nc_full > 0:
            acc, m_i, l_i, p16 = _chain_start(q, ring, 0, NB, m_i, l_i, acc, qk_scale, NB)
            acc, m_i, l_i, p16 = _chain_full(q, ring, 1, nc_full - 1, p16, acc, m_i, l_i, qk_scale)
            if c_tail == 0:
                acc, m_i, l_i, p16 = _chain_step(q, ring, nb0, NB, p16, NB, False, acc, m_i, l_i, qk_scale, NB)
            elif c_tail <= 16:
                acc, m_i, l_i, p_16 = _chain_step(q, ring, nc_full, c_tail, p16, NB, False, acc, m_i, l_i, qk_scale,
                                                  16)
                acc, m_i, l_i, p16 = _chain_step(q, ring, nb0, NB, p_16, c_tail, c_dirty, acc, m_i, l_i, qk_scale,
                                                 NB)
            elif c_tail <= NB // 2:
                acc, m_i, l_i, p_64 = _chain_step(q, ring, nc_full, c_tail, p16, NB, False, acc, m_i, l_i, qk_scale,
                                                  NB // 2)
                acc, m_i, l_i, p16 = _chain_step(q, ring, nb0, NB, p_64, c_tail, c_dirty, acc, m_i, l_i, qk_scale,
                                                 NB)
            else:
                acc, m_i, l_i, p_nb = _chain_step(q, ring, nc_full, c_tail, p16, NB, False, acc, m_i, l_i, qk_scale,
                                                  NB)
                acc, m_i, l_i, p16 = _chain_step(q, ring, nb0, NB, p_nb, c_tail, c_dirty, acc, m_i, l_i, qk_scale,
                                                 NB)
        else:
            if c_tail == 0:
                acc, m_i, l_i, p16 = _chain_start(q, ring, 0, NB, m_i, l_i, acc, qk_scale, NB)
            elif c_tail <= 16:
                acc, m_i, l_i, p_16 = _chain_start(q, ring, 0, c_tail, m_i, l_i, acc, qk_scale, 16)
                acc, m_i, l_i, p16 = _chain_step(q, ring, 1, NB, p_16, c_tail, c_dirty, acc, m_i, l_i, qk_scale, NB)
            elif c_tail <= NB // 2:
                acc, m_i, l_i, p_64 = _chain_start(q, ring, 0, c_tail, m_i, l_i, acc, qk_scale, NB // 2)
                acc, m_i, l_i, p16 = _chain_step(q, ring, 1, NB, p_64, c_tail, c_dirty, acc, m_i, l_i, qk_scale, NB)
            else:
                acc, m_i, l_i, p_nb = _chain_start(q, ring, 0, c_tail, m_i, l_i, acc, qk_scale, NB)
                acc, m_i, l_i, p16 = _chain_step(q, ring, 1, NB, p_nb, c_tail, c_dirty, acc, m_i, l_i, qk_scale, NB)
        # 2. the remaining full current blocks
        acc, m_i, l_i, p16 = _chain_full(q, ring, nb0 + 1, ng_full - 1, p16, acc, m_i, l_i, qk_scale)
        # 3. the current tokens' short last block, then the last P·V
        last = nb0 + ng_full
        if g_tail == 0:
            acc = _chain_end(ring, last - 1, p16, NB, False, acc)
        elif g_tail <= 16:
            acc, m_i, l_i, p_16 = _chain_step(q, ring, last, g_tail, p16, NB, False, acc, m_i, l_i, qk_scale, 16)
            acc = _chain_end(ring, last, p_16, g_tail, g_dirty, acc)
        elif g_tail <= NB // 2:
            acc, m_i, l_i, p_64 = _chain_step(q, ring, last, g_tail, p16, NB, False, acc, m_i, l_i, qk_scale, NB // 2)
            acc = _chain_end(ring, last, p_64, g_tail, g_dirty, acc)
        else:
            acc, m_i, l_i, p_nb = _chain_step(q, ring, last, g_tail, p16, NB, False, acc, m_i, l_i, qk_scale, NB)
            acc = _chain_end(ring, last, p_nb, g_tail, g_dirty, acc)
        return acc, m_i, l_i

    @gluon.jit
    def _attend(q, ring, tile, qk_scale, SCHEDULE: gl.constexpr):
        """One warpgroup's 64 query rows over the tile's key blocks — segment 0 (context), then segment 1 (current
        tokens), in the producer's order: the fp32 state (acc, m, l)."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        HD: gl.constexpr = ring.k_bufs.shape[2]
        WM: gl.constexpr = q.shape[0]
        # One warpgroup, 16 rows per warp, instruction N = the whole block: the Triton kernel's per-row layout.
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, NB, 16])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        m_i = gl.full([WM], float("-inf"), gl.float32, layout=row_l)
        l_i = gl.zeros([WM], gl.float32, layout=row_l)
        acc = gl.zeros([WM, HD], gl.float32, layout=mma)
        if SCHEDULE == 0:  # each segment its own pipeline, partial last blocks outside it
            acc, m_i, l_i, slot = _segment(q, ring, 0, tile.c_len, tile.c_dirty, acc, m_i, l_i, qk_scale)
            acc, m_i, l_i, slot = _segment(q, ring, slot, tile.g_len, tile.g_dirty, acc, m_i, l_i, qk_scale)
        else:  # one chained pipeline over both segments, where there is a full current block to chain through
            if tile.g_len >= NB:
                acc, m_i, l_i = _chained(q, ring, tile, acc, m_i, l_i, qk_scale)
            else:
                acc, m_i, l_i, slot = _segment(q, ring, 0, tile.c_len, tile.c_dirty, acc, m_i, l_i, qk_scale)
                acc, m_i, l_i, slot = _segment(q, ring, slot, tile.g_len, tile.g_dirty, acc, m_i, l_i, qk_scale)
        return acc, m_i, l_i

    @gluon.jit
    def _release_all(ring, nblocks):
        """A warpgroup whose 64 rows are all past the sequence (the 2-row last tile of 4098 or 1026 queries) skips
        the math but still releases every stage in step with the producer (it must not run a round ahead)."""
        for i in range(nblocks):
            ring.wait_k(i)
            ring.release_k(i)
            ring.wait_v(i)
            ring.release_v(i)

    @gluon.jit
    def _packed_rows(r, tile):
        """Tile row r -> (token offset from the tile's first row, query head, written?). A packed last tile (a
        sequence's last pack_r <= 8 rows, GQA group of PACK_G heads sharing one KV head) holds row i of head h + j at
        tile row 8 * j + i: one CTA instead of PACK_G nearly empty ones (4098 and 1026 queries end on 2 rows). A row
        meets the same K/V blocks with the same arithmetic wherever it sits in a tile, so the bits do not move."""
        if tile.PACK_G > 0:
            packed = tile.pack_r > 0
            tok = gl.where(packed, r % 8, r)
            hh = tile.h + gl.where(packed, r // 8, 0)
            ok = gl.where(packed, (r % 8 < tile.pack_r) & (r < 8 * tile.PACK_G), r < tile.rows_left)
        else:
            tok = r
            hh = tile.h + r * 0
            ok = r < tile.rows_left
        return tok, hh, ok

    @gluon.jit
    def _consumer(q_smem, q_bar, ring, out, tile, qk_scale, WG: gl.constexpr, SCHEDULE: gl.constexpr):
        """Consumer warpgroup WG: rows [WG * 64, WG * 64 + 64) of the tile, attended and written out."""
        NB: gl.constexpr = ring.k_bufs.shape[1]
        HD: gl.constexpr = ring.k_bufs.shape[2]
        WM: gl.constexpr = q_smem.shape[1]
        dtype: gl.constexpr = ring.k_bufs.dtype
        PACK_G: gl.constexpr = tile.PACK_G
        q = q_smem.index(WG)
        nb0 = gl.cdiv(tile.c_len, NB)
        nblocks = nb0 + gl.cdiv(tile.g_len, NB)
        rows_here = tile.rows_left
        if PACK_G > 0:
            rows_here = gl.where(tile.pack_r > 0, 8 * PACK_G, tile.rows_left)
        if WG * WM >= rows_here:
            _release_all(ring, nblocks)
        else:
            mbarrier.wait(q_bar, 0)
            acc, m_i, l_i = _attend(q, ring, tile, qk_scale, SCHEDULE)
            row_l: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
            seen = l_i != 0  # as attention_triton: NaN surfaces, finite inputs keep their bits
            l_safe = gl.where(seen, l_i, 1.0)
            o = gl.where(seen[:, None], acc / l_safe[:, None], 0.0)
            lse = gl.where(seen, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
            tok, hh, ok = _packed_rows(WG * WM + gl.arange(0, WM, layout=row_l), tile)
            gl.store(out.LSE + (tile.q_row + tok).to(gl.int64) * out.HQ + hh, lse, mask=ok)
            # Q is no longer read (every QK^T wgmma has completed): its tile stages the output.
            q.store(o.to(dtype))
            fence_async_shared()
            if (tile.pack_r == 0) & (tile.o_tma_ok | (WG * WM + WM <= tile.rows_left)):  # TMA clips at the end only
                tma.async_copy_shared_to_global(out.o_desc, [tile.q_row + WG * WM, tile.h * HD], q)
                tma.store_wait(pendings=0)
            else:  # rows past this sequence belong to the next one: row-masked stores
                CHUNK: gl.constexpr = 16
                layout: gl.constexpr = _rows_layout(HD, 4)
                cols = gl.arange(0, HD, layout=gl.SliceLayout(0, layout))
                for r in gl.static_range(0, WM, CHUNK):
                    r_chunk = WG * WM + r + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
                    c_tok, c_hh, c_ok = _packed_rows(r_chunk, tile)
                    val = q.slice(r, CHUNK, dim=0).load(layout)
                    ptrs = (out.OUT + (tile.q_row + c_tok).to(gl.int64)[:, None] * out.s_ot
                            + (c_hh * out.s_oh)[:, None] + cols[None, :])
                    gl.store(ptrs, val, mask=c_ok[:, None])

    # The launch arguments stay flat (Triton 3.6 passes no aggregate from the host); the kernel groups them at once:
    # query/output (q_desc .. LSE), the context segment (BT0 .. LEN0_S), the current tokens (ROWS1 .. LEN1_S),
    # the query lengths and scalars (CU_Q .. HQ), then the launch's shape flags.
    @gluon.jit(do_not_specialize=["Q_LEN", "LEN0_S", "LEN1_S", "Q_ROWS", "ROWS0", "ROWS1"])
    def _attn_fwd_ws(q_desc, q8_desc, o_desc, k0_desc, v0_desc, k1_desc, v1_desc, OUT, s_ot, s_oh, LSE,
                     BT0, s_bt0, PAGE0, R0, RH0, CH0, ROWS0, CU0, LEN0, LEN0_S,
                     ROWS1, CU1, LEN1, LEN1_S,
                     CU_Q, Q_LEN, Q_ROWS, qk_scale, G, HEAD_OFF, HQ,
                     HAS_CTX: gl.constexpr, CTX_PAGED: gl.constexpr, CTX_CU: gl.constexpr, CTX_LENS: gl.constexpr,
                     HAS_CUR: gl.constexpr, CUR_CU: gl.constexpr, CUR_LENS: gl.constexpr, Q_CU: gl.constexpr,
                     NUM_STAGES: gl.constexpr, SCHEDULE: gl.constexpr, PACK_G: gl.constexpr,
                     num_warps: gl.constexpr):
        BM: gl.constexpr = 2 * q_desc.block_type.shape[0]
        NB: gl.constexpr = k1_desc.block_type.shape[0]
        HD: gl.constexpr = k1_desc.block_type.shape[1]
        dtype: gl.constexpr = q_desc.dtype
        pid_m = gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
        q_start = 0
        if Q_CU:
            q_start = gl.load(CU_Q + b)
            q_len = gl.load(CU_Q + b + 1) - q_start
        else:
            q_len = Q_LEN
        rows_left = q_len - pid_m * BM
        if rows_left <= 0:
            return
        pack_r = gl.to_tensor(0)
        if PACK_G > 0:  # the group's first head runs the packed last tile for all PACK_G heads (_packed_rows)
            if rows_left <= 8:
                if h % PACK_G != 0:
                    return
                pack_r = rows_left
        q_row = q_start + pid_m * BM
        o_tma_ok = q_start + q_len >= Q_ROWS  # this sequence ends the storage: TMA's clipping is the row mask
        kvh = (HEAD_OFF + h) // G - HEAD_OFF // G
        c_base = gl.to_tensor(0)
        c_len = gl.to_tensor(0)
        if HAS_CTX:
            if CTX_PAGED:
                c_len = gl.load(LEN0 + b)
            else:
                c_base, c_len = _extent(CU0, LEN0, LEN0_S, b, CTX_CU, CTX_LENS)
        g_base = gl.to_tensor(0)
        g_len = gl.to_tensor(0)
        if HAS_CUR:
            g_base, g_len = _extent(CU1, LEN1, LEN1_S, b, CUR_CU, CUR_LENS)

        # Whether a segment's partial last block reads rows past the segment from inside the storage (the next
        # sequence, padding, unwritten slots of a cache page) rather than TMA zero-fill: then V is fixed up.
        c_dirty = (c_base + c_len < ROWS0) | CTX_PAGED
        g_dirty = g_base + g_len < ROWS1
        q_smem = gl.allocate_shared_memory(dtype, [2] + q_desc.block_type.shape, q_desc.layout)
        k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, NB, HD], k1_desc.layout)
        v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, NB, HD], v1_desc.layout)
        q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        kready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        kempty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        vready = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        vempty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
        mbarrier.init(q_bar, count=1)
        for i in gl.static_range(NUM_STAGES):
            mbarrier.init(kready.index(i), count=1)
            mbarrier.init(vready.index(i), count=1)
            mbarrier.init(kempty.index(i), count=2)  # both consumer warpgroups release a stage
            mbarrier.init(vempty.index(i), count=2)
        ring = KVRing(k_bufs, v_bufs, kready, kempty, vready, vempty)
        src = KVSource(k0_desc, v0_desc, k1_desc, v1_desc, BT0, s_bt0, PAGE0, R0, RH0, CH0, ROWS0, HAS_CTX,
                       CTX_PAGED, HAS_CUR)
        tile = Tile(q_row, rows_left, pack_r, h, kvh, b, c_base, c_len, g_base, g_len, c_dirty, g_dirty, o_tma_ok,
                    PACK_G)
        out = Output(o_desc, OUT, s_ot, s_oh, LSE, HQ)
        gl.warp_specialize([
            (_consumer, (q_smem, q_bar, ring, out, tile, qk_scale, 0, SCHEDULE)),
            (_consumer, (q_smem, q_bar, ring, out, tile, qk_scale, 1, SCHEDULE)),
            (_producer, (q_desc, q8_desc, src, tile, h * HD, q_smem, q_bar, ring)),
        ], [4, 1], [_CONSUMER_REGS, _PRODUCER_REGS])


@functools.lru_cache(maxsize=None)
def _smem_layout(rows: int, cols: int, dtype: torch.dtype):
    """The swizzled shared-memory layout of a (rows, cols) TMA tile (cached: it is host overhead on every call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _pack_group(gqa_group: int, q_head_offset: int, hq: int) -> int:
    """How many query heads a sequence's last tile packs together when it has at most 8 rows (0: none): the GQA
    group sharing one KV head, when this launch holds whole groups. BAGEL's 4098 and 1026 queries end on a 2-row
    tile: 28 such CTAs become 4."""
    whole = gqa_group > 1 and 8 * gqa_group <= WG_M and q_head_offset % gqa_group == 0 and hq % gqa_group == 0
    return gqa_group if whole else 0


def _aligned_rows(x: torch.Tensor, row_stride: int) -> bool:
    return x.data_ptr() % 16 == 0 and (row_stride * x.element_size()) % 16 == 0


def _paged_view(seg: PagedKV) -> tuple[int, int, int, int, int] | None:
    """How a paged cache reads as one 2-D (rows, columns) TMA matrix whose rows are tokens: (row stride, columns,
    rows per page, rows per KV head, columns per KV head); None where TMA can't address it (then Triton runs).
    NHD layouts keep a token's heads side by side in a row; HND layouts (and vLLM's packed K|V rows) keep one
    head's tokens as consecutive rows of a page."""
    nb, bs, hkv, d = seg.k.shape
    s0, s1, s2, s3 = seg.k.stride()
    if s3 != 1 or seg.v.stride() != seg.k.stride() or bs % 8 or not (bs % BLOCK_N == 0 or BLOCK_N % bs == 0):
        return None
    if s1 < d or s0 % s1:
        return None
    if s2 >= d and (hkv - 1) * s2 + d <= s1:  # NHD
        return s1, (hkv - 1) * s2 + d, s0 // s1, 0, s2
    if s2 % s1 == 0 and s2 >= bs * s1:  # HND
        return s1, d, s0 // s1, s2 // s1, 0
    return None


def _context_and_current(segments: list) -> tuple[ContiguousKV | PagedKV | None, ContiguousKV | None] | None:
    """The one launch this kernel runs: (context or None, current tokens or None) — [cur], [ctx, cur] or a paged
    [ctx] alone; None for any other list (more segments, or a paged segment last after a context)."""
    if len(segments) == 1:
        (seg,) = segments
        return (None, seg) if isinstance(seg, ContiguousKV) else (seg, None)
    if len(segments) == 2 and isinstance(segments[1], ContiguousKV):
        return segments[0], segments[1]
    return None


def gluon_attention_supported(q: torch.Tensor, segments: list, visible_end, state, finalize: bool,
                              out: torch.Tensor | None) -> bool:
    """Whether ``attention_gluon`` takes this call (otherwise the Triton kernel does; both give the same bits).
    The caller (``attention.joint_attention``) has checked that the options and the device allow Gluon."""
    if q.device.type != "cuda":
        return False
    if q.shape[2] != HEAD_DIM:
        return False
    if visible_end is not None or state is not None:
        return False
    if not finalize or q.shape[0] == 0:
        return False
    if q.stride(2) != 1 or q.stride(1) != HEAD_DIM or not _aligned_rows(q, q.stride(0)):
        return False
    if out is not None and not (out.is_contiguous() and out.shape == q.shape and out.dtype == q.dtype):
        return False
    split = _context_and_current(segments)
    if split is None:
        return False
    for seg in (x for x in split if x is not None):
        if isinstance(seg, PagedKV):
            if _paged_view(seg) is None or not all(x.data_ptr() % 16 == 0 for x in (seg.k, seg.v)):
                return False
        elif (seg.k.shape[0] == 0 or seg.k.stride(1) != HEAD_DIM or seg.v.stride(1) != HEAD_DIM
              or seg.k.stride(2) != 1 or seg.v.stride(2) != 1
              or not (_aligned_rows(seg.k, seg.k.stride(0)) and _aligned_rows(seg.v, seg.v.stride(0)))):
            return False
    return True


def attention_gluon(q: torch.Tensor, segments: list, *, cu_seqlens_q: torch.Tensor | None, max_seqlen_q: int,
                    scale: float, gqa_group: int, q_head_offset: int, out: torch.Tensor | None,
                    schedule: str = "auto") -> AttentionOutput:
    """``attention_triton``'s contract for the calls ``gluon_attention_supported`` accepts."""
    tq, hq, d = q.shape
    dev = q.device
    dummy = _dummy(dev)
    ctx, cur = _context_and_current(segments)
    out = out if out is not None else torch.empty_like(q)
    lse = torch.empty(tq, hq, dtype=torch.float32, device=dev)
    kv_layout, q_layout = _smem_layout(BLOCK_N, d, q.dtype), _smem_layout(WG_M, d, q.dtype)

    def rows_desc(x: torch.Tensor, block_rows: int, layout):
        return GluonTensorDescriptor(x, [x.shape[0], x.shape[1] * d], [x.stride(0), 1], [block_rows, d], layout)

    q_desc = rows_desc(q, WG_M, q_layout)
    q8_desc = rows_desc(q, 8, q_layout)  # a packed last tile's per-head 8-row pieces (_packed_rows)
    o_desc = rows_desc(out, WG_M, q_layout)
    if cur is not None:
        k1_desc, v1_desc = rows_desc(cur.k, BLOCK_N, kv_layout), rows_desc(cur.v, BLOCK_N, kv_layout)
        cu1, cur_cu, len1, cur_lens, rows1 = _contiguous_meta(cur, dummy)
    else:  # placeholders of the right block shape; never read
        k1_desc = v1_desc = rows_desc(q, BLOCK_N, kv_layout)
        cu1, cur_cu, len1, cur_lens, rows1 = dummy, False, dummy, False, 0
    bt0, s_bt0, page0, r0, rh0, ch0, rows0 = dummy, 0, 1, 0, 0, 0, 0
    cu0, ctx_cu, len0, ctx_lens = dummy, False, dummy, False
    paged = isinstance(ctx, PagedKV)
    if ctx is None:
        k0_desc, v0_desc = k1_desc, v1_desc
    elif paged:
        row_stride, cols, r0, rh0, ch0 = _paged_view(ctx)
        nb, bs, hkv, _ = ctx.k.shape
        rows0 = (nb - 1) * r0 + (hkv - 1) * rh0 + bs
        pb = min(bs, BLOCK_N)
        page_layout = _smem_layout(pb, d, q.dtype)
        k0_desc, v0_desc = (GluonTensorDescriptor(x, [rows0, cols], [row_stride, 1], [pb, d], page_layout)
                            for x in (ctx.k, ctx.v))
        bt0, s_bt0, page0, len0 = _i32(ctx.block_table), ctx.block_table.stride(0), bs, _i32(ctx.seqlens)
    else:
        k0_desc, v0_desc = rows_desc(ctx.k, BLOCK_N, kv_layout), rows_desc(ctx.v, BLOCK_N, kv_layout)
        cu0, ctx_cu, len0, ctx_lens, rows0 = _contiguous_meta(ctx, dummy)
    batch = 1 if cu_seqlens_q is None else cu_seqlens_q.shape[0] - 1
    grid = (triton.cdiv(max(max_seqlen_q, 1), BLOCK_M), hq, batch)
    _attn_fwd_ws[grid](
        q_desc, q8_desc, o_desc, k0_desc, v0_desc, k1_desc, v1_desc, out, out.stride(0), out.stride(1), lse,
        bt0, s_bt0, page0, r0, rh0, ch0, rows0, cu0, len0, rows0 if not paged else 0, rows1, cu1, len1, rows1,
        dummy if cu_seqlens_q is None else _i32(cu_seqlens_q), tq, tq, scale * LOG2E, gqa_group, q_head_offset, hq,
        HAS_CTX=ctx is not None, CTX_PAGED=paged, CTX_CU=ctx_cu, CTX_LENS=ctx_lens, HAS_CUR=cur is not None,
        CUR_CU=cur_cu, CUR_LENS=cur_lens, Q_CU=cu_seqlens_q is not None, NUM_STAGES=STAGES,
        SCHEDULE=_schedule(ctx, schedule), PACK_G=_pack_group(gqa_group, q_head_offset, hq), num_warps=4, maxnreg=MAXNREG,
    )
    return AttentionOutput(out=out, lse=lse)
