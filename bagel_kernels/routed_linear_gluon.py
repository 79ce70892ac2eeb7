"""Hopper warp-specialized routed GEMM in Gluon: the same arithmetic as ``routed_linear_triton``, scheduled like FA3/CUTLASS.

Why a second implementation: Triton 3.6 cannot warp-specialize this kernel on Hopper, so its single warp group
alternates TMA waits, wgmma and the epilogue (0.79-0.96x cuBLAS measured). Here one producer warp streams x and W
tiles through a ring of shared-memory stages with mbarriers while two consumer warpgroups keep one wgmma group in
flight and run the epilogue; the producer is already filling the next tile's stages during that epilogue.

Exactness: a row's result is the same K loop (BLOCK_K = 64 steps of m64nNk16 wgmma, fp32 accumulation, in K order)
over a tile shape fixed per (N, K, dtype, activation) — never chosen from M — followed by the same epilogue
roundings as the Triton kernel and eager (bias, SwiGLU, residual). Given the routing's segments, row tiles start at
each segment's first row, so a tile holds one expert; without them (or with more than MAX_SEGMENTS), a tile that
straddles the und/gen boundary runs the K loop once per expert present and writes each pass's rows with a
row-masked store. Neither the tile plan nor which program computes a tile changes a row's arithmetic. The GPU
tests check rows are bitwise those of the Triton kernel.

Used for 16-bit inputs on compute capability 9.x (see ``_dispatch.gluon_available``); fp32 and the CPU
interpreter stay on the Triton kernel.
"""
from __future__ import annotations

import torch
import triton

try:  # Gluon ships with Triton >= 3.5; the project pins 3.6 (CPU CI imports this module, never launches it)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonTensorDescriptor
    _HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    _HAVE_GLUON = False


if _HAVE_GLUON:

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
    def _num_row_tiles(M, b1, b2, b3, SEGMENTED: gl.constexpr, BLOCK_M: gl.constexpr):
        if SEGMENTED:
            return (gl.cdiv(b1, BLOCK_M) + gl.cdiv(b2 - b1, BLOCK_M) + gl.cdiv(b3 - b2, BLOCK_M)
                    + gl.cdiv(M - b3, BLOCK_M))
        else:
            return gl.cdiv(M, BLOCK_M)

    @gluon.jit
    def _tile(t, num_m, IDS, M, N, b1, b2, b3, e0, SEGMENTED: gl.constexpr, HAS_IDS: gl.constexpr,
              BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, GROUP_M: gl.constexpr, NW: gl.constexpr):
        """Output tile ``t`` -> (first row, end of its rows, first column, lowest expert, highest expert)."""
        pid_m, pid_n = _tile_coords(t, num_m, gl.cdiv(N, BLOCK_N), GROUP_M)
        if SEGMENTED:
            m0, m_end, e = _segment_rows(pid_m, M, b1, b2, b3, e0, BLOCK_M)
            lo = e
            hi = e
        else:
            m0 = pid_m * BLOCK_M
            m_end = M
            lo, hi = _expert_range(IDS, m0, M, HAS_IDS, BLOCK_M, NW)
        return m0, m_end, pid_n * BLOCK_N, lo, hi

    @gluon.jit
    def _load_partition(x_desc, w_desc, IDS, M, N, K, b1, b2, b3, e0, ready, empty, x_bufs, w_bufs,
                        SEGMENTED: gl.constexpr, HAS_IDS: gl.constexpr, P: gl.constexpr, GROUP_M: gl.constexpr):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = x_bufs.shape[0]
        nbytes: gl.constexpr = x_desc.block_type.nbytes + P * w_desc.block_type.nbytes
        num_m = _num_row_tiles(M, b1, b2, b3, SEGMENTED, BLOCK_M)
        k_iters = gl.cdiv(K, BLOCK_K)
        it = 0
        for t in range(gl.program_id(0), num_m * gl.cdiv(N, BLOCK_N), gl.num_programs(0)):
            m0, m_end, n0, lo, hi = _tile(t, num_m, IDS, M, N, b1, b2, b3, e0, SEGMENTED, HAS_IDS,
                                          BLOCK_M, BLOCK_N, GROUP_M, 1)
            for e in range(lo, hi + 1):
                for kk in range(k_iters):
                    s = it % STAGES
                    # A fresh mbarrier counts as having completed phase "1": the first pass does not wait.
                    mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                    bar = ready.index(s)
                    mbarrier.expect(bar, nbytes)
                    tma.async_copy_global_to_shared(x_desc, [m0, kk * BLOCK_K], bar, x_bufs.index(s))
                    for j in gl.static_range(P):
                        # W is viewed as (E*P*N, K): rows past this part's N land in output columns >= N, which
                        # the store clips, so no tile ever needs them.
                        tma.async_copy_global_to_shared(w_desc, [(e * P + j) * N + n0, kk * BLOCK_K], bar,
                                                        w_bufs.index(s * P + j))
                    it += 1

    @gluon.jit
    def _swiglu(gate, up, out_ty: gl.constexpr):
        """Same roundings as eager: gate and up land in the activation dtype, silu(gate) is rounded, then the product.
        Written again from ``routed_linear_triton._swiglu`` because a Gluon kernel cannot call a Triton function; the
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
    def _store_rows(c_smem, OUT, RES, IDS, m0, m_end, n0, N, ldo, ldr, e, check_ids,
                    HAS_IDS: gl.constexpr, HAS_RES: gl.constexpr, NW: gl.constexpr):
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
            if HAS_IDS:
                ok = ok & ((gl.load(IDS + rows, mask=ok, other=-1) == e) | (check_ids == 0))
            mask = ok[:, None] & (cols < N)[None, :]
            val = c_smem.slice(r, CHUNK, dim=0).load(layout)
            if HAS_RES:
                res = gl.load(RES + rows[:, None] * ldr + cols[None, :], mask=mask, other=0.0)
                val = (res.to(gl.float32) + val.to(gl.float32)).to(val.dtype)
            gl.store(OUT + rows[:, None] * ldo + cols[None, :], val, mask=mask)

    @gluon.jit
    def _mma_partition(x_desc, w_desc, out_desc, res_desc, OUT, RES, BIAS, IDS, M, N, K, ldo, ldr, b1, b2, b3, e0,
                       ready, empty, x_bufs, w_bufs, c_smem, res_bar,
                       SEGMENTED: gl.constexpr, HAS_IDS: gl.constexpr, HAS_BIAS: gl.constexpr,
                       HAS_RES: gl.constexpr, P: gl.constexpr, GROUP_M: gl.constexpr, NW: gl.constexpr):
        BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
        BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
        BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
        STAGES: gl.constexpr = x_bufs.shape[0]
        out_ty: gl.constexpr = out_desc.dtype
        # Both warpgroups split the 128 rows (64 each); instruction N = the whole tile width.
        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                             instr_shape=[16, BLOCK_N, 16])
        col_layout: gl.constexpr = gl.SliceLayout(0, mma_layout)
        num_m = _num_row_tiles(M, b1, b2, b3, SEGMENTED, BLOCK_M)
        k_iters = gl.cdiv(K, BLOCK_K)
        it = 0
        res_phase = 0
        for t in range(gl.program_id(0), num_m * gl.cdiv(N, BLOCK_N), gl.num_programs(0)):
            m0, m_end, n0, lo, hi = _tile(t, num_m, IDS, M, N, b1, b2, b3, e0, SEGMENTED, HAS_IDS,
                                          BLOCK_M, BLOCK_N, GROUP_M, NW)
            cols = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
            cmask = cols < N
            # TMA stores clip at the tensor's edge only: a tile that ends inside the rows of another segment or a
            # tile across the expert boundary goes through the row-masked pointer epilogue.
            via_rows = (lo != hi) | (m_end < gl.minimum(m0 + BLOCK_M, M))
            # The residual of a TMA-stored tile comes by TMA too, into c_smem: issued a few K steps into the tile
            # (once the previous tile's store has left c_smem), it lands under the mainloop instead of being read
            # row chunk by row chunk in the epilogue. The row-masked epilogue still reads it through pointers.
            res_step = gl.to_tensor(-1)
            if HAS_RES:
                res_step = gl.where(via_rows, -1, gl.minimum(2, k_iters - 1))
            for e in range(lo, hi + 1):
                acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
                up = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=mma_layout)
                for kk in range(k_iters):
                    s = it % STAGES
                    mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                    a = x_bufs.index(s)
                    acc = warpgroup_mma(a, w_bufs.index(s * P).permute((1, 0)), acc, is_async=True)
                    if P == 2:
                        up = warpgroup_mma(a, w_bufs.index(s * P + 1).permute((1, 0)), up, is_async=True)
                        # Keep this step's two groups in flight; the previous step's are then done.
                        acc, up = warpgroup_mma_wait(num_outstanding=2, deps=(acc, up))
                    else:
                        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
                    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1, pred=kk > 0)
                    if kk == res_step:
                        tma.store_wait(pendings=0)
                        mbarrier.expect(res_bar, res_desc.block_type.nbytes)
                        tma.async_copy_global_to_shared(res_desc, [m0, n0], res_bar, c_smem)
                    it += 1
                if P == 2:
                    acc, up = warpgroup_mma_wait(num_outstanding=0, deps=(acc, up))
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES), count=1)

                if HAS_BIAS:
                    acc += gl.load(BIAS + e * P * N + cols, mask=cmask, other=0.0).to(gl.float32)[None, :]
                if P == 2:
                    if HAS_BIAS:
                        up += gl.load(BIAS + (e * P + 1) * N + cols, mask=cmask, other=0.0).to(gl.float32)[None, :]
                    acc = _swiglu(acc, up, out_ty)
                if res_step >= 0:
                    # res + the rounded projection, as eager's x + o_proj(a); each thread reads and writes only
                    # the elements it owns (same layout both ways), so no barrier between the load and the store
                    mbarrier.wait(res_bar, res_phase & 1)
                    res_phase += 1
                    res = c_smem.load(mma_layout)
                    c_smem.store((res.to(gl.float32) + acc.to(out_ty).to(gl.float32)).to(out_ty))
                    fence_async_shared()
                    tma.async_copy_shared_to_global(out_desc, [m0, n0], c_smem)
                else:
                    tma.store_wait(pendings=0)  # the previous tile's store has left c_smem
                    c_smem.store(acc.to(out_ty))
                    if via_rows:
                        _store_rows(c_smem, OUT, RES, IDS, m0, m_end, n0, N, ldo, ldr, e, (lo != hi).to(gl.int32),
                                    HAS_IDS, HAS_RES, NW)
                    else:
                        fence_async_shared()
                        tma.async_copy_shared_to_global(out_desc, [m0, n0], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit(do_not_specialize=["b1", "b2", "b3", "e0"])
    def _routed_gemm_ws(x_desc, w_desc, out_desc, res_desc, OUT, RES, BIAS, IDS, M, N, K, ldo, ldr, b1, b2, b3,
                        e0, SEGMENTED: gl.constexpr, HAS_IDS: gl.constexpr, HAS_BIAS: gl.constexpr,
                        HAS_RES: gl.constexpr, P: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                        num_warps: gl.constexpr):
        dtype: gl.constexpr = x_desc.dtype
        x_bufs = gl.allocate_shared_memory(dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
        w_bufs = gl.allocate_shared_memory(dtype, [STAGES * P] + w_desc.block_type.shape, w_desc.layout)
        c_smem = gl.allocate_shared_memory(out_desc.dtype, out_desc.block_type.shape, out_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        res_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(res_bar, count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_mma_partition, (x_desc, w_desc, out_desc, res_desc, OUT, RES, BIAS, IDS, M, N, K, ldo, ldr, b1, b2,
                              b3, e0, ready, empty, x_bufs, w_bufs, c_smem, res_bar, SEGMENTED, HAS_IDS, HAS_BIAS,
                              HAS_RES, P, GROUP_M, num_warps)),
            (_load_partition, (x_desc, w_desc, IDS, M, N, K, b1, b2, b3, e0, ready, empty, x_bufs, w_bufs,
                               SEGMENTED, HAS_IDS, P, GROUP_M)),
        ], [1], [40])


# Fixed per (N, K, dtype, activation), never from M (see routed_linear_triton.gemm_config for why).
BLOCK_M, BLOCK_K, GROUP_M = 128, 64, 8
NUM_WARPS = 8  # two consumer warpgroups; the producer warp comes on top
MAXNREG = 168  # 65536 registers / (3 warpgroups x 128 threads); the producer gives its share to the consumers


def _block_n(swiglu: bool) -> int:
    return 128 if swiglu else 256  # SwiGLU holds two accumulators (gate, up): same registers as one 256-wide


def _stages(swiglu: bool) -> int:
    """Operand stages: 3 x 48 KiB + the 64 KiB epilogue tile fill the 227 KiB of shared memory; SwiGLU's epilogue
    tile is half that (128 x 128), which leaves room for a fourth stage (H100, session 7: -1 % to +3.7 % on
    gate_up, close to noise; Hopper's mainloop is not stage-bound at 3)."""
    return 4 if swiglu else 3


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


def routed_gemm_gluon(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      expert_ids: torch.Tensor | None, swiglu: bool = False,
                      residual: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      segments: tuple[tuple[int, int, int], ...] | None = None) -> torch.Tensor:
    """``routed_gemm_triton``'s contract on the warp-specialized kernel: x (M, K) contiguous; weight (E, P, N, K)
    contiguous; bias (E, P, N) or None; expert_ids (M,) int32 on x's device or None (one expert).

    ``segments`` — the routing as host-side ``(start, end, expert)`` runs — lets row tiles start at each
    segment's first row (at most ``MAX_SEGMENTS`` runs), so no tile runs its K loop twice for two experts; the
    bits are the same either way (a row's result does not depend on its tile)."""
    from .routed_linear_triton import _num_programs

    m, k = x.shape
    e, p, n, _ = weight.shape
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bounds = _segment_bounds(segments if segments is not None else (None if e > 1 else ((0, m, 0),)), m)
    if bounds is None and expert_ids is None and e > 1:
        raise ValueError("routed_gemm_gluon: a weight with several experts needs expert_ids or segments")
    bn = _block_n(swiglu)
    gdt = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16
    x_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gdt)
    w_layout = gl.NVMMASharedLayout.get_default_for([bn, BLOCK_K], gdt)
    o_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_M, bn], gdt)
    x_desc = GluonTensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], x_layout)
    w_desc = GluonTensorDescriptor.from_tensor(weight.view(e * p * n, k), [bn, BLOCK_K], w_layout)
    out_desc = GluonTensorDescriptor.from_tensor(out, [BLOCK_M, bn], o_layout)
    res_desc = out_desc if residual is None else GluonTensorDescriptor.from_tensor(residual, [BLOCK_M, bn], o_layout)
    # Upper bound on row tiles (segment starts add at most MAX_SEGMENTS - 1): only sizes the persistent grid.
    tiles = (triton.cdiv(m, BLOCK_M) + MAX_SEGMENTS - 1) * triton.cdiv(n, bn)
    res = residual if residual is not None else out
    b1, b2, b3, e0 = bounds if bounds is not None else (0, 0, 0, 0)
    _routed_gemm_ws[(_num_programs(x.device, tiles),)](
        x_desc, w_desc, out_desc, res_desc, out, res, bias if bias is not None else x,
        expert_ids if expert_ids is not None else x, m, n, k, out.stride(0), res.stride(0), b1, b2, b3, e0,
        SEGMENTED=bounds is not None, HAS_IDS=bounds is None and expert_ids is not None,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None, P=p,
        GROUP_M=GROUP_M, STAGES=_stages(swiglu), num_warps=NUM_WARPS, maxnreg=MAXNREG,
    )
    return out
