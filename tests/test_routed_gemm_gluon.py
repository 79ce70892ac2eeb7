"""The Hopper warp-specialized routed GEMM (Gluon): its tile plan, that it builds for sm_90a with the pinned Triton
(no GPU needed: Triton compiles to a cubin on the CPU), and — on a Hopper GPU — that its rows are bitwise the Triton
kernel's for every routing, epilogue and tile plan."""
from __future__ import annotations

import os

import pytest
import torch

import bagel_kernels.routed_gemm_gluon as rg
from helpers import gemm_operands
from hopper_build import compile_for_hopper, ptx_facts, report_from_child

gluon = pytest.importorskip("triton.experimental.gluon")


def test_segment_bounds_cover_the_rows_in_alternating_runs():
    # img2img prefill: text (und), image (gen), text (und)
    assert rg._segment_bounds(((0, 40, 0), (40, 4138, 1), (4138, 4198, 0)), 4198) == (40, 4138, 4198, 0)
    # one expert everywhere: the later bounds sit at M (empty segments)
    assert rg._segment_bounds(((0, 12294, 1),), 12294) == (12294, 12294, 12294, 1)
    # adjacent runs of one expert merge, empty runs vanish
    assert rg._segment_bounds(((0, 5, 0), (5, 5, 1), (5, 9, 0), (9, 10, 1)), 10) == (9, 10, 10, 0)


def test_segment_bounds_fall_back_when_the_plan_cannot_hold_the_routing():
    five = tuple((i, i + 1, i % 2) for i in range(5))
    assert rg._segment_bounds(five, 5) is None  # more than MAX_SEGMENTS runs: row tiles with expert ids
    assert rg._segment_bounds(((0, 3, 0),), 4) is None  # does not cover the rows
    assert rg._segment_bounds(None, 4) is None


def _segment_rows_host(mt: int, m: int, b1: int, b2: int, b3: int, e0: int, block_m: int):
    """The kernel's tile -> (first row, end, expert) arithmetic, written plainly."""
    bounds = [0, b1, b2, b3, m]
    for i in range(4):
        tiles = -(-(bounds[i + 1] - bounds[i]) // block_m)
        if mt < tiles:
            return bounds[i] + mt * block_m, bounds[i + 1], e0 ^ (i & 1)
        mt -= tiles
    raise IndexError


@pytest.mark.parametrize("segments,m", [(((0, 40, 0), (40, 4138, 1), (4138, 4198, 0)), 4198),
                                        (((0, 300, 1),), 300), (((0, 1, 1), (1, 129, 0), (129, 130, 1)), 130)])
def test_segment_tiles_cover_each_row_once_with_its_expert(segments, m):
    b1, b2, b3, e0 = rg._segment_bounds(segments, m)
    expert = torch.empty(m, dtype=torch.long).fill_(-1)
    for s0, s1, g in segments:
        expert[s0:s1] = g
    covered = torch.zeros(m, dtype=torch.long)
    mt = 0
    while True:
        try:
            m0, end, e = _segment_rows_host(mt, m, b1, b2, b3, e0, rg.BLOCK_M)
        except IndexError:
            break
        rows = torch.arange(m0, min(m0 + rg.BLOCK_M, end))
        assert (expert[rows] == e).all(), "a tile mixes experts"
        covered[rows] += 1
        mt += 1
    assert (covered == 1).all()


@pytest.mark.parametrize("tiles,programs,k_iters", [
    (490, 132, 56), (490, 132, 296), (630, 132, 56), (5180, 132, 56), (1386, 132, 56),  # BAGEL's projections
    (72, 7, 6), (72, 20, 6), (133, 132, 1), (264, 132, 3), (10, 132, 56), (7, 3, 2), (5, 2, 1)])
def test_split_tail_plan_runs_every_k_step_of_every_tile_once_in_order(tiles, programs, k_iters):
    items = {pid: rg.stream_k_items(pid, programs, tiles, k_iters) for pid in range(programs)}
    pieces: dict[int, list[tuple[int, int, int, int]]] = {}
    for pid, its in items.items():
        for t, k0, k1, kind in its:
            assert 0 <= t < tiles and 0 <= k0 < k1 <= k_iters
            pieces.setdefault(t, []).append((k0, k1, kind, pid))
    assert sorted(pieces) == list(range(tiles))
    for t, ps in pieces.items():
        ps.sort()
        assert [p[0] for p in ps] == [0] + [p[1] for p in ps[:-1]] and ps[-1][1] == k_iters, (t, ps)
        if len(ps) > 1:  # a split tile: the head and the tail, on neighbouring programs
            (_, _, k_head, producer), (_, _, k_tail, consumer) = ps
            assert len(ps) == 2 and (k_head, k_tail) == (1, 2) and consumer == producer + 1
        else:
            assert ps[0][2] == 0
    done = {}  # when (in K steps of its own program) each head's partial is published
    for pid, its in items.items():
        kinds = [kind for *_, kind in its]
        assert kinds.count(1) <= 1 and kinds.count(2) <= 1 and 2 not in kinds[:-1]  # the tail runs last
        clock = 0
        for t, k0, k1, kind in its:
            clock += k1 - k0
            if kind == 1:
                done[t] = clock
    for pid, its in items.items():
        # a tail is never reached before its neighbour's head is done (programs that start together never wait)
        if its and its[-1][3] == 2:
            t = its[-1][0]
            assert sum(k1 - k0 for _, k0, k1, _ in its[:-1]) >= done[t]
    work = [sum(k1 - k0 for _, k0, k1, _ in its) for its in items.values()]
    if tiles > programs and tiles % programs:  # the ragged last round is spread: no program does a whole extra tile
        assert max(work) - min(work) <= 1, work
    assert sum(work) == tiles * k_iters


def test_tile_plan_fill_is_the_prefill_ceiling():
    """probes/gemm_rounds.py's model of the launch: the img2img prefill's o_proj is 35 row tiles (40 + 4098 + 60
    rows start their own tiles) x 14 column tiles = 490 tiles, 4 rounds on 132 programs for 3.48 rounds of rows —
    fill 0.87, which is where ours / dense cuBLAS measures; the generation step's split rounds fill 0.99."""
    from probes.gemm_rounds import tile_plan

    prefill = ((0, 40, 0), (40, 4138, 1), (4138, 4198, 0))
    o_proj = tile_plan(prefill, 3584, False, 132)
    assert (o_proj["row_tiles"], o_proj["tiles"], o_proj["rounds"], o_proj["fill"]) == (35, 490, 4, 0.87)
    assert tile_plan(prefill, 18944, True, 132)["rounds"] == round(35 * 148 / 132, 2)  # split: fractional
    assert tile_plan(((0, 3 * 4098, 1),), 3584, False, 132)["fill"] == 0.99


def test_split_tail_is_off_when_the_rounds_are_even_or_asked_off():
    assert all(kind == 0 for pid in range(132) for *_, kind in rg.stream_k_items(pid, 132, 264, 56))
    assert all(kind == 0 for pid in range(132) for *_, kind in rg.stream_k_items(pid, 132, 490, 56, False))
    assert rg.stream_k_items(3, 132, 490, 56, False) == [(t, 0, 56, 0) for t in (3, 135, 267, 399)]
    # auto: only where whole rounds dominate (the generation step's 10+ rounds, not the prefill's 3-4)
    assert rg.split_tail_wanted(1386, 132) and not rg.split_tail_wanted(490, 132)
    assert not rg.split_tail_wanted(1320, 132) and not rg.split_tail_wanted(100, 132)
    assert rg.split_tail_wanted(490, 132, force=True) and not rg.split_tail_wanted(1320, 132, force=True)
    assert not rg.split_tail_wanted(1386, 132, force=False)


def _compile_for_hopper(swiglu: bool, segmented: bool, has_ids: bool, has_bias: bool, has_res: bool,
                        split_wg: bool = False):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    m, n, k = 300, 512, 256
    p, bn = (2 if swiglu else 1), rg._block_n(swiglu)
    x = torch.empty(m, k, dtype=torch.bfloat16)
    w = torch.empty(2 * p * n, k, dtype=torch.bfloat16)
    out = torch.empty(m, n, dtype=torch.bfloat16)

    def desc(t, block):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))

    box_m = rg.BLOCK_M // 2 if split_wg else rg.BLOCK_M  # a split consumer partition stores its 64 rows
    args = dict(x_desc=desc(x, [rg.BLOCK_M, rg.BLOCK_K]), w_desc=desc(w, [bn, rg.BLOCK_K]),
                out_desc=desc(out, [box_m, bn]), res_desc=desc(out, [box_m, bn]), OUT=out, RES=out, BIAS=x,
                IDS=torch.empty(m, dtype=torch.int32), WS=torch.empty(1), FLAGS=torch.empty(1, dtype=torch.int32),
                XS=torch.empty(1), WSC=torch.empty(1),
                M=m, N=n, K=k, ldo=n, ldr=n, b1=40, b2=250, b3=300, e0=0, split_tail=1)
    warps = rg.NUM_WARPS // 2 if split_wg else rg.NUM_WARPS
    consts = dict(SEGMENTED=segmented, HAS_IDS=has_ids, HAS_BIAS=has_bias, HAS_RES=has_res, P=p,
                  GROUP_M=rg.GROUP_M, STAGES=rg._stages(swiglu), num_warps=warps, SCALED=False, PROMOTE=False,
                  SPLIT_WG=split_wg)
    return compile_for_hopper(rg._routed_gemm_ws, args, consts, warps, rg.MAXNREG)


BUILD_VARIANTS = [  # swiglu, segmented, has_ids, has_bias, has_res[, split_wg]
    (False, True, False, True, False),   # QKV (bias)
    (False, True, False, False, True),   # o_proj / down (residual)
    (True, True, False, False, False),   # gate/up SwiGLU
    (False, False, True, True, True),    # many segments: row tiles with expert ids
    (True, False, False, False, False),  # one expert, no routing
    # the "two consumer partitions" schedule variant (bench_routed_gemm --sweep): QKV, o_proj, gate/up
    (False, True, False, True, False, True),
    (False, True, False, False, True, True),
    (True, True, False, False, False, True),
]


def _build_report() -> list[dict]:
    return [{"variant": v, **ptx_facts(_compile_for_hopper(*v))} for v in BUILD_VARIANTS]


def test_gluon_kernel_builds_for_hopper():
    """Every kernel variant the model launches (and the split-partition schedule variant the benchmark times)
    compiles to sm_90a with warp-specialized wgmma and fits shared memory.
    Built in a fresh process without the interpreter: with TRITON_INTERPRET=1 (as this suite runs) Triton's own
    helpers are interpreter objects, and the GPU never compiles in that mode."""
    report = report_from_child(__file__)
    assert len(report) == len(BUILD_VARIANTS)
    for r in report:
        assert r["sm_90a"] and r["wgmma"] and r["setmaxnreg"], r  # warp-specialized wgmma, not a fallback
        assert r["shared"] <= 227 * 1024, r


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                    or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU and compiled kernels: TRITON_INTERPRET=0 pytest ... on the GPU")
@pytest.mark.parametrize("swiglu,bias,residual", [(False, True, False), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("m", [1, 17, 300, 1000])
def test_gluon_rows_are_the_triton_kernels_bits(swiglu, bias, residual, m):
    from bagel_kernels.routed_gemm_triton import routed_gemm_triton

    n, k, p = 512, 384, (2 if swiglu else 1)
    x, w, b, res = gemm_operands(m, n, k, p, bias, residual, seed=m)
    segments = ((0, m // 3, 0), (m // 3, m - m // 5, 1), (m - m // 5, m, 0))
    ids = torch.zeros(m, dtype=torch.int32, device="cuda")
    ids[m // 3:m - m // 5] = 1
    want = routed_gemm_triton(x, w, b, ids, swiglu, res)
    for segs in (segments, None):  # segment-aligned row tiles, and fixed row tiles that straddle the boundary
        got = rg.routed_gemm_gluon(x, w, b, ids, swiglu, res, segments=segs)
        assert torch.equal(got, want)
    # a row subset (rows change tile and position) gives the same rows
    s0, s1 = m // 4, m // 4 + max(1, m // 2)
    sub = rg.routed_gemm_gluon(x[s0:s1].contiguous(), w, b, ids[s0:s1].contiguous(), swiglu,
                               None if res is None else res[s0:s1].contiguous())
    assert torch.equal(sub, want[s0:s1])


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="needs a GPU and compiled kernels: TRITON_INTERPRET=0 pytest ... on the GPU")
@pytest.mark.parametrize("swiglu,residual", [(False, False), (True, False), (False, True)])
def test_rows_do_not_depend_on_how_many_programs_share_the_gpu(swiglu, residual, monkeypatch):
    """A GPU partition (MPS thread percentage, a smaller SKU) gives the persistent GEMMs fewer programs: the bits must
    not move."""
    import bagel_kernels._launch as launch
    import bagel_kernels.routed_gemm_triton as rt

    m, n, k, p = 2000, 1024, 512, (2 if swiglu else 1)
    x, w, _, res = gemm_operands(m, n, k, p, False, residual, seed=7)
    ids = torch.zeros(m, dtype=torch.int32, device="cuda")
    ids[300:1900] = 1
    segments = ((0, 300, 0), (300, 1900, 1), (1900, 2000, 0))
    kernels = [lambda split: rt.routed_gemm_triton(x, w, None, ids, swiglu, res)]
    if torch.cuda.get_device_capability()[0] == 9:
        kernels += [lambda split: rg.routed_gemm_gluon(x, w, None, ids, swiglu, res, segments=segments,
                                                       split_tail=split),
                    lambda split: rg.routed_gemm_gluon(x, w, None, ids, swiglu, res, split_tail=split)]
    full = [f(None) for f in kernels]
    for programs in (1, 7, 20, 113):
        monkeypatch.setitem(launch._SM_COUNT, torch.cuda.current_device(), programs)
        for split in (False, True):  # the Gluon kernel's ragged last round run whole, and split (stream_k_items)
            for f, want in zip(kernels, full):
                assert torch.equal(f(split), want), f"bits changed with {programs} programs, split tail {split}"


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
                    or torch.cuda.get_device_capability()[0] != 9,
                    reason="needs a Hopper GPU and compiled kernels: TRITON_INTERPRET=0 pytest ... on the GPU")
@pytest.mark.parametrize("swiglu,bias,residual", [(False, True, False), (True, False, False), (False, False, True)])
@pytest.mark.parametrize("split_tail", [False, True])
def test_two_consumer_partitions_give_the_shipped_bits(swiglu, bias, residual, split_tail):
    """The schedule variant with one partition per consumer warpgroup (``split_wg``) runs each row's wgmma as the
    shipped kernel does: every row's bits equal, with segment-aligned tiles, straddling tiles (expert ids) and the
    stream-K split of the last round."""
    m, n, k, p = 1500, 1024, 512, (2 if swiglu else 1)
    x, w, b, res = gemm_operands(m, n, k, p, bias, residual, seed=11)
    ids = torch.zeros(m, dtype=torch.int32, device="cuda")
    ids[200:1410] = 1
    bn, st = rg._block_n(swiglu), rg._stages(swiglu)
    for segs in (((0, 200, 0), (200, 1410, 1), (1410, 1500, 0)), None):
        got, want = (rg.launch_routed_gemm_ws(x, w, torch.empty(m, n, device="cuda", dtype=torch.bfloat16), b, ids,
                                              swiglu, res, segs, split_tail, bn, rg.BLOCK_K, st, split_wg=sw)
                     for sw in (True, False))
        assert torch.equal(got, want), f"segments {segs}"


if __name__ == "__main__":  # the build check's child process (see test_gluon_kernel_builds_for_hopper)
    import json

    print(json.dumps(_build_report()))
