"""Hopper warp-specialized routed GEMM in Gluon: the same arithmetic as ``routed_gemm_triton``, scheduled like FA3/CUTLASS.

Why a second implementation: Triton 3.6 cannot warp-specialize this kernel on Hopper, so its single warp group
alternates TMA waits, wgmma and the epilogue and trails cuBLAS (benchmarks/RESULTS.md). Here one producer warp streams
x and W tiles through a ring of shared-memory stages with mbarriers while two consumer warpgroups keep one wgmma group
in flight and run the epilogue; the producer is already filling the next tile's stages during that epilogue.

Exactness: a row's result is the same K loop (BLOCK_K = 64 steps of m64nNk16 wgmma, fp32 accumulation, in K order)
over a tile shape fixed per (N, K, dtype, activation) — never chosen from M — followed by the same epilogue
roundings as the Triton kernel and eager (bias, SwiGLU, residual). Given the routing's segments, row tiles start at
each segment's first row, so a tile holds one expert; without them (or with more than MAX_SEGMENTS), a tile that
straddles the und/gen boundary runs the K loop once per expert present and writes each pass's rows with a
row-masked store. Neither the tile plan nor which program computes a tile changes a row's arithmetic. Where whole
rounds of tiles dominate, the ragged last round is split across programs along K (``stream_k_items``): not a
split-K reduction (which docs/DESIGN.md §3 forbids) but one K loop continued by a second program from the
first one's fp32 accumulators, so the arithmetic stays the same. The GPU tests check rows are bitwise those of the
Triton kernel, with the split on and off.

Used for 16-bit inputs on compute capability 9.x (see ``_dispatch.gluon_available``); fp32 and the CPU
interpreter stay on the Triton kernel. The FP8 routed GEMM (``routed_gemm_fp8_gluon``) launches this same kernel on
e4m3 operands through ``launch_routed_gemm_ws``: ``SCALED`` applies its row and channel scales in the epilogue and
``PROMOTE`` adds each K step's MMA sum to an fp32 accumulator; with both off (the bf16 launches) the compiled
instructions are the bf16 kernel's as before.
"""
import functools

import torch
import triton

from ._gluon_common import _HAVE_GLUON
from ._launch import _dummy, _num_programs

if _HAVE_GLUON:  # Gluon ships with Triton >= 3.5; the project pins 3.6 (CPU CI imports this module, never launches it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor

    from ._gluon_common import SCALAR, aggregate, field, phase


if _HAVE_GLUON:

    @aggregate
    class Routing:
        """Which expert each of the M rows belongs to. SEGMENTED: at most four alternating-expert segments [0, b1),
        [b1, b2), [b2, b3), [b3, M), the first of expert e0 (row tiles start at each segment's first row); else
        per-row expert ids IDS (HAS_IDS), or one expert for all rows."""
        M: SCALAR
        b1: SCALAR
        b2: SCALAR
        b3: SCALAR
        e0: SCALAR
        IDS: gl.tensor
        SEGMENTED: gl.constexpr
        HAS_IDS: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, M, b1, b2, b3, e0, IDS, SEGMENTED, HAS_IDS):
            self.M = field(M)
            self.b1 = field(b1)
            self.b2 = field(b2)
            self.b3 = field(b3)
            self.e0 = field(e0)
            self.IDS = IDS
            self.SEGMENTED = gl.constexpr(SEGMENTED)
            self.HAS_IDS = gl.constexpr(HAS_IDS)

    @aggregate
    class OperandRing:
        """The ring of operand stages in shared memory: stage s holds an x tile and the P weight tiles of one K step
        (w_bufs[s * P + j]); "ready" completes when a stage's copies have landed, "empty" when the MMA warpgroups
        have released it."""
        x_bufs: gl.shared_memory_descriptor
        w_bufs: gl.shared_memory_descriptor
        ready: gl.shared_memory_descriptor
        empty: gl.shared_memory_descriptor

        @gluon.constexpr_function
        def __init__(self, x_bufs, w_bufs, ready, empty):
            self.x_bufs = x_bufs
            self.w_bufs = w_bufs
            self.ready = ready
            self.empty = empty

    @aggregate
    class Epilogue:
        """Where a tile's result goes: out by TMA (out_desc) or row-masked stores (OUT, row stride ldo), plus the
        per-expert bias (HAS_BIAS) and the residual (HAS_RES: res_desc / RES, row stride ldr). SCALED (the FP8
        kernel): the accumulator is first multiplied by the fp32 row scale XS[row] and channel scale
        WS[expert, part, column], in that order (``routed_gemm_fp8_gluon``)."""
        out_desc: tma.tensor_descriptor
        res_desc: tma.tensor_descriptor
        OUT: gl.tensor
        RES: gl.tensor
        BIAS: gl.tensor
        XS: gl.tensor
        WS: gl.tensor
        ldo: SCALAR
        ldr: SCALAR
        HAS_BIAS: gl.constexpr
        HAS_RES: gl.constexpr
        SCALED: gl.constexpr

        @gluon.constexpr_function
        def __init__(self, out_desc, res_desc, OUT, RES, BIAS, XS, WS, ldo, ldr, HAS_BIAS, HAS_RES, SCALED):
            self.out_desc = out_desc
            self.res_desc = res_desc
            self.OUT = OUT
            self.RES = RES
            self.BIAS = BIAS
            self.XS = XS
            self.WS = WS
            self.ldo = field(ldo)
            self.ldr = field(ldr)
            self.HAS_BIAS = gl.constexpr(HAS_BIAS)
            self.HAS_RES = gl.constexpr(HAS_RES)
            self.SCALED = gl.constexpr(SCALED)

    @aggregate
    class SplitTail:
        """The split of the ragged last round (``stream_k_items``): on when ``split_tail`` != 0; a head's fp32
        partial sums go through WS, and FLAGS tells the next program they are there."""
        WS: gl.tensor
        FLAGS: gl.tensor
        split_tail: SCALAR

        @gluon.constexpr_function
        def __init__(self, WS, FLAGS, split_tail):
            self.WS = WS
            self.FLAGS = FLAGS
            self.split_tail = field(split_tail)

    @gluon.jit
    def _tile_coords(t, num_m, num_n, GROUP_M: gl.constexpr):
        # Grouped order: consecutive programs share weight tiles in L2 (same order as the Triton kernel).
        per_group = GROUP_M * num_n
        first_m = (t // per_group) * GROUP_M
        size_m = gl.minimum(num_m - first_m, GROUP_M)
        return first_m + (t % per_group) % size_m, (t % per_group) // size_m

    @gluon.jit
    def _expert_range(IDS, m0, M, HAS_IDS: gl.constexpr, BLOCK_M: gl.constexpr, NW: gl.constexpr):
        """Lowest and highest expert among the tile's rows; every partition computes it for itself."""
        if HAS_IDS:
            layout: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
            rows = m0 + gl.arange(0, BLOCK_M, layout=layout)
            ids = gl.load(IDS + rows, mask=rows < M, other=0)
            lo = gl.min(gl.where(rows < M, ids, 1 << 20), axis=0)
            hi = gl.max(gl.where(rows < M, ids, -1), axis=0)
        else:
            lo = gl.to_tensor(0)
            hi = gl.to_tensor(0)
        return lo, hi

    @gluon.jit
    def _segment_rows(mt, M, b1, b2, b3, e0, BLOCK_M: gl.constexpr):
        """Row tile ``mt`` of a routing cut into (at most four, alternating-expert) segments [0, b1), [b1, b2),
        [b2, b3), [b3, M): tiles start at their segment's first row, so no tile mixes experts.
        Returns (first row, segment end, expert)."""
        t0 = gl.cdiv(b1, BLOCK_M)
        t1 = t0 + gl.cdiv(b2 - b1, BLOCK_M)
        t2 = t1 + gl.cdiv(b3 - b2, BLOCK_M)
        m0 = gl.where(mt >= t2, b3 + (mt - t2) * BLOCK_M,
                      gl.where(mt >= t1, b2 + (mt - t1) * BLOCK_M,
                               gl.where(mt >= t0, b1 + (mt - t0) * BLOCK_M, mt * BLOCK_M)))
        end = gl.where(mt >= t2, M, gl.where(mt >= t1, b3, gl.where(mt >= t0, b2, b1)))
        e = gl.where(mt >= t2, e0 ^ 1, gl.where(mt >= t1, e0, gl.where(mt >= t0, e0 ^ 1, e0)))
        return m0, end, e

    @gluon.jit
    def _num_row_tiles(r, BLOCK_M: gl.constexpr):
        if r.SEGMENTED:
            return (gl.cdiv(r.b1, BLOCK_M) + gl.cdiv(r.b2 - r.b1, BLOCK_M) + gl.cdiv(r.b3 - r.b2, BLOCK_M)
                    + gl.cdiv(r.M - r.b3, BLOCK_M))
        else:
            return gl.cdiv(r.M, BLOCK_M)

    @gluon.jit
    def _tile(t, num_m, r, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr,
              NW: gl.constexpr):
        """Output tile ``t`` of routing ``r`` -> (first row, end of its rows, first column, lowest expert, highest
        expert)."""
        pid_m, pid_n = _tile_coords(t, num_m, gl.cdiv(N, BLOCK_N), GROUP_M)
        if r.SEGMENTED:
            m0, m_end, e = _segment_rows(pid_m, r.M, r.b1, r.b2, r.b3, r.e0, BLOCK_M)
            lo = e
            hi = e
        else:
            m0 = pid_m * BLOCK_M
            m_end = r.M
            lo, hi = _expert_range(r.IDS, m0, r.M, r.HAS_IDS, BLOCK_M, NW)
        return m0, m_end, pid_n * BLOCK_N, lo, hi

    @gluon.jit
    def _plan(num_tiles, k_iters, split_tail):
        """This program's share of the launch (``stream_k_items`` is the same arithmetic on the host, with the why).
        Returns (work items, dp_tiles, own dp tiles, tail tile, its first K step, head tile, its K steps, whole
        split-region tiles [first, first + count))."""
        pid = gl.program_id(0)
        nprog = gl.num_programs(0)
        rounds = num_tiles // nprog
        dp = num_tiles
        if (split_tail != 0) & (rounds > 0) & (num_tiles % nprog != 0):
            dp = (rounds - 1) * nprog
        span = (num_tiles - dp) * k_iters
        s = pid * span // nprog
        e = (pid + 1) * span // nprog
        tail_t = s // k_iters
        tail_k = s - tail_t * k_iters
        head_t = e // k_iters
        head_k = e - head_t * k_iters
        full_lo = tail_t + (tail_k > 0).to(gl.int32)
        n_dp = gl.cdiv(gl.maximum(dp - pid, 0), nprog)
        n_items = (head_k > 0).to(gl.int32) + n_dp + (head_t - full_lo) + (tail_k > 0).to(gl.int32)
        return n_items, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, head_t - full_lo

    @gluon.jit
    def _item(w, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, n_full, k_iters):
        """Work item ``w`` of this program -> (tile, first K step, end K step, kind): kind 0 runs a whole tile,
        1 the head of a split tile (its partial sum goes to the workspace), 2 the tail (starts from that sum).
        Order: whole tiles of the even rounds, the head, whole split-region tiles, the tail."""
        is_head = (head_k > 0) & (w == n_dp)
        j = w - gl.where((head_k > 0) & (w > n_dp), 1, 0)
        t = gl.where(j < n_dp, gl.program_id(0) + j * gl.num_programs(0),
                     gl.where(j - n_dp < n_full, dp + full_lo + (j - n_dp), dp + tail_t))
        is_tail = (j >= n_dp + n_full) & (is_head == 0)
        k0 = gl.where(is_tail, tail_k, 0)
        kind = gl.where(is_head, 1, gl.where(is_tail, 2, 0))
        t = gl.where(is_head, dp + head_t, t)
        k1 = gl.where(is_head, head_k, k_iters)
        return t, k0, k1, kind

    @gluon.jit
    def _wait_partial(FLAGS, slot, part_bar, TARGET: gl.constexpr):
        """Spin (one warp) until all TARGET consumer threads of program ``slot`` have published its head's partial
        sum, reset the flag for the next launch, and tell the MMA warpgroups through ``part_bar``. Only a program
        with a lower index is ever waited on, and programs start in index order, so the wait cannot deadlock."""
        lane = gl.arange(0, 32, layout=gl.BlockedLayout([1], [32], [1], [0]))
        zero = lane * 0
        flag = FLAGS + slot + zero
        seen = gl.min(gl.atomic_add(flag, zero, sem="acquire", scope="gpu"), axis=0)
        while seen < TARGET:
            seen = gl.min(gl.atomic_add(flag, zero, sem="acquire", scope="gpu"), axis=0)
        gl.store(flag, zero, mask=lane == 0)
        mbarrier.arrive(part_bar, count=1)

    @gluon.jit
    def _load_partition(x_desc, w_desc, routing, N, K, split, ring, part_bar, P: gl.constexpr,
                        GROUP_M: gl.constexpr, CONSUMERS: gl.constexpr):
        """The producer warp: every work item's x and W tiles by TMA into the ring, K step by K step."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = ring.x_bufs.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + P * w_desc.block_type.nbytes
        num_m = _num_row_tiles(routing, BLOCK_M)
        k_iters = gl.cdiv(K, BLOCK_K)
        n_items, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, n_full = _plan(
            num_m * gl.cdiv(N, BLOCK_N), k_iters, split.split_tail)
        it = 0
        for w in range(n_items):
            t, k0, k1, kind = _item(w, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, n_full, k_iters)
            m0, m_end, n0, lo, hi = _tile(t, num_m, routing, N, BLOCK_M, BLOCK_N, GROUP_M, 1)
            if kind == 2:
                _wait_partial(split.FLAGS, gl.program_id(0) - 1, part_bar, CONSUMERS)
            for e in range(lo, hi + 1):
                for kk in range(k0, k1):
                    s = it % STAGES
                    mbarrier.wait(ring.empty.index(s), phase(it, STAGES) ^ 1)
                    bar = ring.ready.index(s)
                    mbarrier.expect(bar, nbytes)
                    tma.async_copy_global_to_shared(x_desc, [m0, kk * BLOCK_K], bar, ring.x_bufs.index(s))
                    for j in gl.static_range(P):
                        # W is viewed as (E*P*N, K): rows past this part's N land in output columns >= N, which
                        # the store clips, so no tile ever needs them.
                        tma.async_copy_global_to_shared(w_desc, [(e * P + j) * N + n0, kk * BLOCK_K], bar,
                                                        ring.w_bufs.index(s * P + j))
                    it += 1

    @gluon.jit
    def _swiglu(gate, up, out_ty: gl.constexpr):
        """Same roundings as eager: gate and up land in the activation dtype, silu(gate) is rounded, then the product.
        Written again from ``routed_gemm_triton._swiglu`` because a Gluon kernel cannot call a Triton function; the
        GPU tests check the two kernels' bits are equal."""
        g = gate.to(out_ty).to(gl.float32)
        s = (g / (1.0 + gl.exp(-g))).to(out_ty).to(gl.float32)
        return s * up.to(out_ty).to(gl.float32)

    @gluon.constexpr_function
    def _rows_layout(block_n, num_warps):
        """Coalesced 16-byte-per-thread layout for a (rows, block_n) chunk of the output tile."""
        tpw_n = min(32, block_n // 8)
        return gl.BlockedLayout([1, 8], [32 // tpw_n, tpw_n], [num_warps, 1], [1, 0])

    @gluon.jit
    def _store_rows(c_smem, epi, routing, m0, m_end, n0, N, e, check_ids, NW: gl.constexpr):
        """Epilogue through pointers, CHUNK rows at a time from the rounded tile in shared memory, for rows
        [m0, m_end) only: adds the residual (``res + rounded projection``, as eager's ``x + linear(h)``) and, in a
        tile that straddles the und/gen boundary (``check_ids``), writes only the rows of expert ``e``. Chunks keep
        the pointer registers small (the whole tile's pointers would spill next to the accumulator)."""
        BLOCK_M: gl.constexpr = c_smem.shape[0]
        BLOCK_N: gl.constexpr = c_smem.shape[1]
        CHUNK: gl.constexpr = 32
        layout: gl.constexpr = _rows_layout(BLOCK_N, NW)
        cols = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        for r in gl.static_range(0, BLOCK_M, CHUNK):
            rows = m0 + r + gl.arange(0, CHUNK, layout=gl.SliceLayout(1, layout))
            ok = rows < m_end
            if routing.HAS_IDS:
                ok = ok & ((gl.load(routing.IDS + rows, mask=ok, other=-1) == e) | (check_ids == 0))
            mask = ok[:, None] & (cols < N)[None, :]
            val = c_smem.slice(r, CHUNK, dim=0).load(layout)
            if epi.HAS_RES:
                res = gl.load(epi.RES + rows[:, None] * epi.ldr + cols[None, :], mask=mask, other=0.0)
                val = (res.to(gl.float32) + val.to(gl.float32)).to(val.dtype)
            gl.store(epi.OUT + rows[:, None] * epi.ldo + cols[None, :], val, mask=mask)

    @gluon.jit
    def _partial_ptrs(WS, slot, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, P: gl.constexpr,
                      layout: gl.constexpr, ROW0: gl.constexpr, ROWS: gl.constexpr):
        """Where program ``slot``'s split-tile partial sums live: (BLOCK_M, P * BLOCK_N) fp32, written and read in
        the accumulator's own layout (each thread reads back the elements it wrote; the fp32 round trip is exact,
        so the tail's K loop continues the head's bit for bit). Built where used: hoisted, these offsets would
        hold a register per accumulator element."""
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, layout))
        if ROW0 != 0:  # a half-tile partition (SPLIT_WG): its rows of the tile's (BLOCK_M, P * BLOCK_N) partial
            rows = rows + ROW0
        return WS + slot * (BLOCK_M * P * BLOCK_N) + rows[:, None] * (P * BLOCK_N) + cols[None, :]

    @gluon.jit
    def _mma_partition(x_desc, w_desc, epi, routing, N, K, split, ring, c_smem, res_bar, part_bar, P: gl.constexpr,
                       GROUP_M: gl.constexpr, NW: gl.constexpr, PROMOTE: gl.constexpr, ROW0: gl.constexpr,
                       ROWS: gl.constexpr):
        """MMA warpgroups: each work item's K loop of wgmma from the ring, then its epilogue, for rows
        [ROW0, ROW0 + ROWS) of every tile. Shipped: one partition of both warpgroups (NW = 8), the whole tile. With
        ``SPLIT_WG`` each warpgroup is its own partition (NW = 4) of 64 rows, ``c_smem`` its half of the epilogue
        tile, and it releases each stage on its own (the "empty" barriers count two arrivals): the same wgmma per
        row, without the 256-thread barrier the one partition runs before every K step's release."""
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = ring.x_bufs.shape[0]
        HAS_BIAS: gl.constexpr = epi.HAS_BIAS
        HAS_RES: gl.constexpr = epi.HAS_RES
        out_ty: gl.constexpr = epi.out_desc.dtype
        # Both warpgroups split the 128 rows (64 each); instruction N = the whole tile width.
        # (wgmma's K per instruction: 16 for 16-bit operands, 32 for FP8)
        INSTR_K: gl.constexpr = 256 // x_desc.dtype.primitive_bitwidth
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, BLOCK_N, INSTR_K])
        HALF: gl.constexpr = ROWS != BLOCK_M  # a half-tile partition (SPLIT_WG)
        col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        flag_layout: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
        num_m = _num_row_tiles(routing, BLOCK_M)
        k_iters = gl.cdiv(K, BLOCK_K)
        n_items, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, n_full = _plan(
            num_m * gl.cdiv(N, BLOCK_N), k_iters, split.split_tail)
        zero = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=mma_layout)
        it = 0
        res_phase = 0
        for w in range(n_items):
            t, k0, k1, kind = _item(w, dp, n_dp, tail_t, tail_k, head_t, head_k, full_lo, n_full, k_iters)
            m0, m_end, n0, lo, hi = _tile(t, num_m, routing, N, BLOCK_M, BLOCK_N, GROUP_M, NW)
            cols = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
            cmask = cols < N
            # TMA stores clip at the tensor's edge only: a tile that ends inside the rows of another segment or a
            # tile across the expert boundary goes through the row-masked pointer epilogue.
            via_rows = (lo != hi) | (m_end < gl.minimum(m0 + BLOCK_M, routing.M))
            # The residual of a TMA-stored tile comes by TMA too, into c_smem: issued a few K steps into the tile
            # (once the previous tile's store has left c_smem), it lands under the mainloop instead of being read
            # row chunk by row chunk in the epilogue. The row-masked epilogue still reads it through pointers.
            res_step = gl.to_tensor(-1)
            if HAS_RES:
                res_step = gl.where(via_rows | (kind == 1), -1, gl.minimum(k0 + 2, k1 - 1))
            for e in range(lo, hi + 1):
                # The tail of a split tile starts from the head's partial sums, other tiles from zero. One masked
                # load instead of a branch: ptxas serializes the wgmma pipeline when a branch merges the two.
                is_tail = gl.full((ROWS, BLOCK_N), 0, gl.int32, layout=mma_layout) + (kind == 2).to(gl.int32)
                if kind == 2:
                    mbarrier.wait(part_bar, 0)
                part = _partial_ptrs(split.WS, gl.program_id(0) - 1, BLOCK_M, BLOCK_N, P, mma_layout, ROW0, ROWS)
                acc = gl.load(part, mask=is_tail != 0, other=0.0, cache_modifier=".cg")
                if P == 2:
                    up = gl.load(part + BLOCK_N, mask=is_tail != 0, other=0.0, cache_modifier=".cg")
                else:
                    up = gl.zeros((ROWS, BLOCK_N), dtype=gl.float32, layout=mma_layout)
                for kk in range(k0, k1):
                    s = it % STAGES
                    mbarrier.wait(ring.ready.index(s), phase(it, STAGES))
                    a = ring.x_bufs.index(s)
                    if HALF:
                        a = a.slice(ROW0, ROWS, dim=0)
                    if PROMOTE:
                        # FP8: the K step's products accumulate in the MMA's own (narrower than fp32) accumulator
                        # from zero, then one true fp32 add onto the running sum (DeepSeek-V3's promotion; what
                        # tl.dot's max_num_imprecise_acc = BLOCK_K does). Synchronous: the adds need the step, and
                        # a second step in flight would need a third accumulator, which spills at 168 registers
                        # (ptxas then serializes every wgmma). The two consumer warpgroups overlap each other's.
                        t0 = warpgroup_mma(a, ring.w_bufs.index(s * P).permute((1, 0)), zero, use_acc=False,
                                           is_async=True)
                        if P == 2:
                            t1 = warpgroup_mma(a, ring.w_bufs.index(s * P + 1).permute((1, 0)), zero,
                                               use_acc=False, is_async=True)
                            t0, t1 = warpgroup_mma_wait(num_outstanding=0, deps=(t0, t1))
                            up += t1
                        else:
                            t0 = warpgroup_mma_wait(num_outstanding=0, deps=(t0, ))
                        acc += t0
                        mbarrier.arrive(ring.empty.index(s), count=1)
                    else:
                        acc = warpgroup_mma(a, ring.w_bufs.index(s * P).permute((1, 0)), acc, is_async=True)
                        if P == 2:
                            up = warpgroup_mma(a, ring.w_bufs.index(s * P + 1).permute((1, 0)), up, is_async=True)
                            # Keep this step's two groups in flight; the previous step's are then done.
                            acc, up = warpgroup_mma_wait(num_outstanding=2, deps=(acc, up))
                        else:
                            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                        mbarrier.arrive(ring.empty.index((it + STAGES - 1) % STAGES), count=1, pred=kk > k0)
                    if kk == res_step:
                        tma.store_wait(pendings=0)
                        mbarrier.expect(res_bar, epi.res_desc.block_type.nbytes)
                        tma.async_copy_global_to_shared(epi.res_desc, [m0 + ROW0, n0], res_bar, c_smem)
                    it += 1
                if not PROMOTE:
                    if P == 2:
                        acc, up = warpgroup_mma_wait(num_outstanding=0, deps=(acc, up))
                    else:
                        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    mbarrier.arrive(ring.empty.index((it + STAGES - 1) % STAGES), count=1)

                if kind == 1:
                    # Head of a split tile: publish the partial sums for the next program (which runs the tail).
                    # Each thread's release orders its own stores; the waiter counts all NW * 32 of them.
                    part = _partial_ptrs(split.WS, gl.program_id(0), BLOCK_M, BLOCK_N, P, mma_layout, ROW0, ROWS)
                    gl.store(part, acc, cache_modifier=".cg")
                    if P == 2:
                        gl.store(part + BLOCK_N, up, cache_modifier=".cg")
                    ones = gl.full([NW * 32], 1, gl.int32, layout=flag_layout)
                    gl.atomic_add(split.FLAGS + gl.program_id(0) + ones * 0, ones, sem="release", scope="gpu")
                else:
                    if epi.SCALED:  # acc * row scale * channel scale (the FP8 reference's order), then the bias
                        rows = m0 + ROW0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, mma_layout))
                        xs = gl.load(epi.XS + rows, mask=rows < routing.M, other=0.0)[:, None]
                        acc = acc * xs * gl.load(epi.WS + e * P * N + cols, mask=cmask, other=0.0)[None, :]
                        if P == 2:
                            up = up * xs * gl.load(epi.WS + (e * P + 1) * N + cols, mask=cmask, other=0.0)[None, :]
                    if HAS_BIAS:
                        acc += gl.load(epi.BIAS + e * P * N + cols, mask=cmask, other=0.0).to(gl.float32)[None, :]
                    if P == 2:
                        if HAS_BIAS:
                            b_up = gl.load(epi.BIAS + (e * P + 1) * N + cols, mask=cmask, other=0.0)
                            up += b_up.to(gl.float32)[None, :]
                        acc = _swiglu(acc, up, out_ty)
                    if res_step >= 0:
                        # res + the rounded projection, as eager's x + o_proj(a); each thread reads and writes only
                        # the elements it owns (same layout both ways), so no barrier between the load and the store
                        mbarrier.wait(res_bar, phase(res_phase, 1))
                        res_phase += 1
                        res = c_smem.load(mma_layout)
                        c_smem.store((res.to(gl.float32) + acc.to(out_ty).to(gl.float32)).to(out_ty))
                        fence_async_shared()
                        tma.async_copy_shared_to_global(epi.out_desc, [m0 + ROW0, n0], c_smem)
                    else:
                        tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                        c_smem.store(acc.to(out_ty))
                        if via_rows:
                            _store_rows(c_smem, epi, routing, m0 + ROW0, m_end, n0, N, e, (lo != hi).to(gl.int32),
                                        NW)
                        else:
                            fence_async_shared()
                            tma.async_copy_shared_to_global(epi.out_desc, [m0 + ROW0, n0], c_smem)
        tma.store_wait(pendings=0)

    # The launch arguments stay flat (Triton 3.6 passes no aggregate from the host); the kernel groups them at once:
    # descriptors and pointers (x_desc .. FLAGS), the problem (M, N, K, row strides), the routing (b1 .. e0), the
    # split switch, then the shape flags.
    @gluon.jit(do_not_specialize=["b1", "b2", "b3", "e0", "split_tail"])
    def _routed_gemm_ws(x_desc, w_desc, out_desc, res_desc, OUT, RES, BIAS, IDS, WS, FLAGS, XS, WSC, M, N, K, ldo,
                        ldr, b1, b2, b3, e0, split_tail, SEGMENTED: gl.constexpr, HAS_IDS: gl.constexpr,
                        HAS_BIAS: gl.constexpr,
                        HAS_RES: gl.constexpr, P: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        num_warps: gl.constexpr, SCALED: gl.constexpr = False, PROMOTE: gl.constexpr = False,
                        SPLIT_WG: gl.constexpr = False):
        # SPLIT_WG (a schedule variant, ``launch_routed_gemm_ws(split_wg=True)``): each consumer warpgroup its own
        # partition of 64 rows (num_warps = 4 each); out_desc / res_desc then have 64-row boxes.
        dtype: gl.constexpr = x_desc.dtype
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [STAGES * P] + w_desc.block_type.shape, w_desc.layout)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, [BLOCK_M, out_desc.block_type.shape[1]], out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        res_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        part_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(res_bar, count=1)
        mbarrier.init(part_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2 if SPLIT_WG else 1)
        routing = Routing(M, b1, b2, b3, e0, IDS, SEGMENTED, HAS_IDS)
        ring = OperandRing(x_bufs, w_bufs, ready, empty)
        epi = Epilogue(out_desc, res_desc, OUT, RES, BIAS, XS, WSC, ldo, ldr, HAS_BIAS, HAS_RES, SCALED)
        split = SplitTail(WS, FLAGS, split_tail)
        if SPLIT_WG:
            HALF_M: gl.constexpr = BLOCK_M // 2
            res_bar1 = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
            mbarrier.init(res_bar1, count=1)
            gl.warp_specialize([
                (_mma_partition, (x_desc, w_desc, epi, routing, N, K, split, ring, c_smem.slice(0, HALF_M, dim=0),
                                  res_bar, part_bar, P, GROUP_M, num_warps, PROMOTE, 0, HALF_M)),
                (_mma_partition, (x_desc, w_desc, epi, routing, N, K, split, ring,
                                  c_smem.slice(HALF_M, HALF_M, dim=0), res_bar1, part_bar, P, GROUP_M, num_warps,
                                  PROMOTE, HALF_M, HALF_M)),
                (_load_partition, (x_desc, w_desc, routing, N, K, split, ring, part_bar, P, GROUP_M,
                                   2 * num_warps * 32)),
            ], [num_warps, 1], [168, 40])  # the second consumer: MAXNREG registers, as the first
        else:
            gl.warp_specialize([
                (_mma_partition, (x_desc, w_desc, epi, routing, N, K, split, ring, c_smem, res_bar, part_bar, P,
                                  GROUP_M, num_warps, PROMOTE, 0, BLOCK_M)),
                (_load_partition, (x_desc, w_desc, routing, N, K, split, ring, part_bar, P, GROUP_M, num_warps * 32)),
            ], [1], [40])


# Fixed per (N, K, dtype, activation), never from M (see routed_gemm_triton.gemm_config for why).
BLOCK_M, BLOCK_K, GROUP_M = 128, 64, 8
NUM_WARPS = 8  # two consumer warpgroups; the producer warp comes on top
MAXNREG = 168  # 65536 registers / (3 warpgroups x 128 threads); the producer gives its share to the consumers


def _block_n(swiglu: bool) -> int:
    return 128 if swiglu else 256  # SwiGLU holds two accumulators (gate, up): same registers as one 256-wide


def _stages(swiglu: bool) -> int:
    """Operand stages: 3 x 48 KiB + the 64 KiB epilogue tile fill the 227 KiB of shared memory; SwiGLU's epilogue
    tile is half that (128 x 128), which leaves room for a fourth stage. The fourth stage is a free use of that
    room, not a speed-up that matters: Hopper's mainloop is not stage-bound at 3."""
    return 4 if swiglu else 3


def stream_k_items(pid: int, programs: int, tiles: int, k_iters: int, split_tail: bool = True
                   ) -> list[tuple[int, int, int, int]]:
    """Program ``pid``'s work as (tile, first K step, end K step, kind) — the host twin of the kernel's ``_plan`` and
    ``_item``, for tests and for reading.

    Why split: a persistent grid of P programs over T equal tiles takes ceil(T / P) tile-times, and BAGEL's
    projections leave a ragged last round (o_proj at the 3 x 4098-token generation step: 1386 tiles = 10.5 rounds
    run as 11). So the last one to two rounds' worth of tiles, [dp, T), is dealt out as a contiguous range of K
    steps per program (stream-K), and every program does T / P tile-times. Exactness: the two pieces of a split
    tile are the same K loop, continued — the head's fp32 partial sums go through memory unchanged and the tail's
    wgmma accumulate onto them — so no row's bits depend on the split. The split region holds at least P tiles, so a
    program's range is at least one tile long: at most one tail (started by program pid - 1) and one head (finished
    by pid + 1). A program runs its head before its whole split-region tiles and its tail last, so the partial it
    waits on is ready: its neighbour's head ends no later than its own head and whole tiles do."""
    rounds = tiles // programs
    dp = (rounds - 1) * programs if split_tail and rounds > 0 and tiles % programs else tiles
    span = (tiles - dp) * k_iters
    s, e = pid * span // programs, (pid + 1) * span // programs
    tail_t, tail_k = divmod(s, k_iters)
    head_t, head_k = divmod(e, k_iters)
    items = [(t, 0, k_iters, 0) for t in range(pid, dp, programs)]
    items += [(dp + head_t, 0, head_k, 1)] if head_k else []
    items += [(dp + t, 0, k_iters, 0) for t in range(tail_t + (tail_k > 0), head_t)]
    items += [(dp + tail_t, tail_k, k_iters, 2)] if tail_k else []
    return items


SPLIT_MIN_ROUNDS = 8


def split_tail_wanted(tiles: int, programs: int, force: bool | None = None) -> bool:
    """Whether a launch splits its ragged last round (``stream_k_items``). The programs of a split region run at
    different K offsets, so unlike whole tiles in lockstep they do not share operand K-slices in L2; that costs
    more than the ragged round saves unless whole rounds dominate: with many rounds (the generation step's
    projections) the split wins a little; with a few (the prefill's qkv, o_proj and down) it loses, because the
    split programs re-read operands from DRAM that lockstep tiles would have shared in L2.
    ``force`` (the GPU tests' handle) splits (True) or keeps (False) any ragged last round. The bits are the same
    either way, so choosing from M is allowed."""
    if tiles <= programs or tiles % programs == 0:
        return False  # no ragged round
    return force if force is not None else tiles >= SPLIT_MIN_ROUNDS * programs


_SPLIT_FLAGS: dict[tuple[int, int], torch.Tensor] = {}


def _split_flags(device: torch.device, programs: int) -> torch.Tensor:
    """Per (device, stream) int32 flags for split tiles, zero between launches: the program that waits on a flag
    resets it, so no memset is launched per call."""
    key = (device.index if device.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(device).cuda_stream)
    flags = _SPLIT_FLAGS.get(key)
    if flags is None or flags.numel() < programs:
        flags = _SPLIT_FLAGS[key] = torch.zeros(max(programs, 256), dtype=torch.int32, device=device)
    return flags


@functools.lru_cache(maxsize=None)
def _no_workspace(device: torch.device) -> torch.Tensor:
    """The workspace argument of a launch that splits nothing (fp32 like a real one: one compiled kernel)."""
    return torch.empty(1, dtype=torch.float32, device=device)


def _row_tiles(bounds: tuple[int, int, int, int] | None, m: int) -> int:
    if bounds is None:
        return triton.cdiv(m, BLOCK_M)
    b1, b2, b3, _ = bounds
    return sum(triton.cdiv(hi - lo, BLOCK_M) for lo, hi in ((0, b1), (b1, b2), (b2, b3), (b3, m)))


MAX_SEGMENTS = 4  # routings with more expert segments fall back to row tiles that may straddle a boundary


def _segment_bounds(segments: tuple[tuple[int, int, int], ...] | None, m: int) -> tuple[int, int, int, int] | None:
    """(b1, b2, b3, expert of the first segment) for up to MAX_SEGMENTS alternating segments covering [0, m)."""
    if segments is None:
        return None
    merged: list[list[int]] = []
    for s0, s1, ex in segments:
        if s1 <= s0:
            continue
        if merged and merged[-1][2] == int(ex) and merged[-1][1] == s0:
            merged[-1][1] = s1
        else:
            merged.append([s0, s1, int(ex)])
    if not merged or len(merged) > MAX_SEGMENTS or merged[0][0] != 0 or merged[-1][1] != m:
        return None
    bounds = [seg[1] for seg in merged[:-1]] + [m] * (MAX_SEGMENTS - len(merged))
    return bounds[0], bounds[1], bounds[2], merged[0][2]


_GL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float8_e4m3fn: "float8e4nv"}


def launch_routed_gemm_ws(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None,
                          expert_ids: torch.Tensor | None, swiglu: bool, residual: torch.Tensor | None,
                          segments: tuple[tuple[int, int, int], ...] | None, split_tail: bool | None,
                          block_n: int, block_k: int, stages: int, x_scale: torch.Tensor | None = None,
                          w_scale: torch.Tensor | None = None, promote: bool = False,
                          group_m: int = GROUP_M, split_wg: bool = False) -> torch.Tensor:
    """Launch the warp-specialized kernel on (M, K) x and (E, P, N, K) weight into ``out`` with the given tile
    (BLOCK_M x block_n x block_k) and ring depth: ``routed_gemm_gluon`` (16-bit operands) and
    ``routed_gemm_fp8_gluon`` (e4m3 operands with fp32 row scales ``x_scale`` (M,) and channel scales ``w_scale``
    (E, P, N); ``promote``: an fp32 promotion after every K step) share it. ``group_m``: row tiles per L2 group of
    the tile order (which tile a program computes never changes a row's bits). ``split_wg``: each consumer
    warpgroup its own partition (``_mma_partition``; a schedule variant for ``bench_routed_gemm --sweep``, the same
    bits)."""
    m, k = x.shape
    e, p, n, _ = weight.shape
    if m == 0:
        return out
    bounds = _segment_bounds(segments if segments is not None else (None if e > 1 else ((0, m, 0),)), m)
    if bounds is None and expert_ids is None and e > 1:
        raise ValueError("routed_gemm_gluon: a weight with several experts needs expert_ids or segments")
    gdt = getattr(gl, _GL_DTYPES[x.dtype])
    odt = getattr(gl, _GL_DTYPES[out.dtype])
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, block_k], gdt)
    w_layout = gl.NVMMASharedLayout.get_default_for([block_n, block_k], gdt)
    box_m = BLOCK_M // 2 if split_wg else BLOCK_M  # the epilogue's TMA box: a consumer partition's rows
    o_layout = gl.NVMMASharedLayout.get_default_for([box_m, block_n], odt)
    x_desc = GluonTensorDescriptor.from_tensor(x, [BLOCK_M, block_k], x_layout)
    w_desc = GluonTensorDescriptor.from_tensor(weight.view(e * p * n, k), [block_n, block_k], w_layout)
    out_desc = GluonTensorDescriptor.from_tensor(out, [box_m, block_n], o_layout)
    res_desc = (out_desc if residual is None
                else GluonTensorDescriptor.from_tensor(residual, [box_m, block_n], o_layout))
    has_ids = bounds is None and expert_ids is not None
    tiles = _row_tiles(bounds, m) * triton.cdiv(n, block_n)
    progs = _num_programs(x.device, tiles)
    # Tiles of the ids-only plan may run their K loop once per expert: they are never split.
    split = not has_ids and split_tail_wanted(tiles, progs, split_tail)
    ws = (torch.empty(progs * BLOCK_M * p * block_n, dtype=torch.float32, device=x.device) if split
          else _no_workspace(x.device))
    flags = _split_flags(x.device, progs) if split else _dummy(x.device)  # never read unsplit
    res = residual if residual is not None else out
    b1, b2, b3, e0 = bounds if bounds is not None else (0, 0, 0, 0)
    scaled = x_scale is not None
    _routed_gemm_ws[(progs,)](
        x_desc, w_desc, out_desc, res_desc, out, res, bias if bias is not None else out,
        expert_ids if expert_ids is not None else out, ws, flags,
        x_scale if scaled else ws, w_scale if scaled else ws,
        m, n, k, out.stride(0), res.stride(0), b1, b2, b3, e0, int(split),
        SEGMENTED=bounds is not None, HAS_IDS=has_ids,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, P=p,
        GROUP_M=group_m, STAGES=stages, num_warps=NUM_WARPS // 2 if split_wg else NUM_WARPS, SCALED=scaled,
        PROMOTE=promote, SPLIT_WG=split_wg, maxnreg=MAXNREG,
    )
    return out


def routed_gemm_gluon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      expert_ids: torch.Tensor | None, swiglu: bool = False,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      segments: tuple[tuple[int, int, int], ...] | None = None,
                      split_tail: bool | None = None) -> torch.Tensor:
    """``routed_gemm_triton``'s contract on the warp-specialized kernel: x (M, K) contiguous; weight (E, P, N, K)
    contiguous; bias (E, P, N) or None; expert_ids (M,) int32 on x's device or None (one expert).

    ``segments`` — the routing as host-side ``(start, end, expert)`` runs — lets row tiles start at each
    segment's first row (at most ``MAX_SEGMENTS`` runs), so no tile runs its K loop twice for two experts; the
    bits are the same either way (a row's result does not depend on its tile). ``split_tail``: see
    ``split_tail_wanted`` (None: its rule)."""
    m = x.shape[0]
    if out is None:
        out = torch.empty(m, weight.shape[2], dtype=x.dtype, device=x.device)
    return launch_routed_gemm_ws(x, weight, out, bias, expert_ids, swiglu, residual, segments, split_tail,
                                 _block_n(swiglu), BLOCK_K, _stages(swiglu))
