"""The Hopper warp-specialized attention (Gluon): which calls it takes, how it addresses every paged-cache layout
through one 2-D TMA matrix, that every variant builds for sm_90a with the pinned Triton (no GPU needed), and — on a
Hopper GPU — that its output and LSE are bitwise the Triton kernel's."""
from __future__ import annotations

import os

import pytest
import torch

import bagel_kernels as bk
import bagel_kernels.attention_gluon as ag
from hopper_build import compile_for_hopper, ptx_facts, report_from_child

gluon = pytest.importorskip("triton.experimental.gluon")


@pytest.mark.parametrize("layout", bk.LAYOUTS)
@pytest.mark.parametrize("block_size", [16, 256])
def test_paged_view_rows_address_every_token_of_every_head(layout, block_size):
    """(page, slot, head) -> TMA (row, column) lands on the element the strided view holds, for K and V."""
    nb, hkv, d = 3, 4, 128
    raw = bk.allocate_kv_cache(layout, nb, block_size, hkv, d, dtype=torch.bfloat16)
    view = bk.normalize_kv_cache(raw, layout)
    seg = bk.PagedKV(view.k, view.v, torch.zeros(1, nb, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    row_stride, cols, r0, rh, ch = ag._paged_view(seg)
    rows = (nb - 1) * r0 + (hkv - 1) * rh + block_size
    for x in (view.k, view.v):
        for page in range(nb):
            for slot in (0, block_size - 1):
                for head in range(hkv):
                    row, col = page * r0 + head * rh + slot, head * ch
                    assert row < rows and col + d <= cols <= row_stride
                    assert x[page, slot, head, 0].data_ptr() == x.data_ptr() + (row * row_stride + col) * 2


def test_paged_view_refuses_pages_tma_cannot_tile():
    view = bk.normalize_kv_cache(bk.allocate_kv_cache("flash_attn", 2, 12, 4, 128, dtype=torch.bfloat16), "flash_attn")
    seg = bk.PagedKV(view.k, view.v, torch.zeros(1, 2, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    assert ag._paged_view(seg) is None  # 12-token pages do not divide the 128-key block


def test_one_launch_is_a_context_and_the_current_tokens():
    z = torch.zeros(16, 4, 128, dtype=torch.bfloat16)
    c, c2 = bk.ContiguousKV(z, z), bk.ContiguousKV(z, z)
    view = bk.normalize_kv_cache(bk.allocate_kv_cache("flash_attn", 1, 16, 4, 128, dtype=torch.bfloat16), "flash_attn")
    p = bk.PagedKV(view.k, view.v, torch.zeros(1, 1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
    for segs, want in (([c], (None, c)), ([p], (p, None)), ([p, c], (p, c)), ([c2, c], (c2, c))):
        got = ag._context_and_current(segs)
        assert got is not None and all(a is b for a, b in zip(got, want))
    assert ag._context_and_current([c, p]) is None  # a paged segment after a context: chained Triton launches
    assert ag._context_and_current([p, c, c2]) is None


def test_schedule_chains_only_contexts_with_a_full_block():
    """"auto" picks the issue order from host-known lengths only; an unknown name is an error naming the choices."""
    kv = lambda n: bk.ContiguousKV(torch.zeros(n, 4, 128), torch.zeros(n, 4, 128))  # noqa: E731
    assert ag._schedule(None) == ag.SCHEDULES["segment"]
    assert ag._schedule(kv(64)) == ag.SCHEDULES["segment"]
    assert ag._schedule(kv(2450)) == ag.SCHEDULES["chained"]
    short_varlen = bk.ContiguousKV(torch.zeros(200, 4, 128), torch.zeros(200, 4, 128), max_seqlen=64,
                                   cu_seqlens=torch.tensor([0, 64, 128, 200], dtype=torch.int32))
    assert ag._schedule(short_varlen) == ag.SCHEDULES["segment"]
    assert ag._schedule(None, "chained") == ag.SCHEDULES["chained"]  # KernelOptions.attention_schedule
    with pytest.raises(ValueError, match="attention schedule"):
        bk.KernelOptions(attention_schedule="fastest")


def test_short_last_tiles_pack_only_whole_gqa_groups():
    """The packed last tile holds 8 rows of each head of one KV head's group, in one warpgroup's 64 rows: only whole
    groups of at most 8 heads pack (a Ulysses slice that starts mid-group does not)."""
    assert ag._pack_group(7, 0, 28) == 7  # BAGEL: 28 query heads over 4 KV heads
    assert ag._pack_group(7, 7, 7) == 7  # a Ulysses rank holding one whole group
    assert ag._pack_group(7, 3, 7) == 0  # ... starting mid-group
    assert ag._pack_group(1, 0, 28) == 0 and ag._pack_group(16, 0, 32) == 0  # MHA; groups past one warpgroup


def test_gluon_path_is_only_taken_where_it_applies():
    q = torch.zeros(8, 28, 128, dtype=torch.bfloat16)
    kv = bk.ContiguousKV(torch.zeros(8, 4, 128, dtype=torch.bfloat16), torch.zeros(8, 4, 128, dtype=torch.bfloat16))
    assert not ag.gluon_attention_supported(q, [kv], None, None, True, None)  # CPU tensors: never
    if torch.cuda.is_available():
        qc, kvc = q.cuda(), bk.ContiguousKV(kv.k.cuda(), kv.v.cuda())
        vis = torch.full((8,), 8, dtype=torch.int32, device="cuda")
        assert not ag.gluon_attention_supported(qc, [kvc], vis, None, True, None)  # prefill mask: Triton
        assert not ag.gluon_attention_supported(qc, [kvc], None, None, False, None)  # resumable state: Triton
        assert not ag.gluon_attention_supported(qc.float(), [kvc], None, None, True, None)


BUILD_VARIANTS = [  # has_ctx, paged, has_cur, q_cu, cur_lens, ctx_cu, schedule
    (True, False, True, False, False, False, 0),   # benchmark shape: contiguous context + current tokens
    (True, True, True, False, True, False, 0),     # the denoise step: paged context, current tokens with seqlens
    (True, False, True, True, False, True, 0),     # three CFG branches in one varlen launch
    (False, False, True, True, False, False, 0),   # current tokens only, varlen
    (True, True, False, False, False, False, 0),   # a paged context alone
    (True, True, True, False, True, False, 1),     # the chained schedule: one pipeline through both segments
    (True, False, True, True, False, True, 1),     # ... in the varlen launch
]


def _compile_for_hopper(has_ctx, paged, has_cur, q_cu, cur_lens, ctx_cu, schedule=0):
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    d = ag.HEAD_DIM
    q = torch.empty(300, 28, d, dtype=torch.bfloat16)
    k = torch.empty(300, 4, d, dtype=torch.bfloat16)
    i32 = torch.empty(4, dtype=torch.int32)
    f32 = torch.empty(4, dtype=torch.float32)

    def desc(t, rows, block):
        layout = gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16)
        return TensorDescriptor(t, [rows, t.shape[1] * d], [t.shape[1] * d, 1], block, layout)

    qd, kd = desc(q, 300, [ag.WG_M, d]), desc(k, 300, [ag.BLOCK_N, d])
    pd = desc(k, 288, [16, d]) if paged else kd
    args = dict(q_desc=qd, q8_desc=desc(q, 300, [8, d]), o_desc=qd, k0_desc=pd, v0_desc=pd, k1_desc=kd, v1_desc=kd,
                OUT=q, s_ot=28 * d, s_oh=d,
                LSE=f32, BT0=i32, s_bt0=8, PAGE0=16, R0=16, RH0=0, CH0=d, ROWS0=288, CU0=i32, LEN0=i32, LEN0_S=288,
                ROWS1=300, CU1=i32, LEN1=i32, LEN1_S=300, CU_Q=i32, Q_LEN=300, Q_ROWS=300, qk_scale=0.1, G=7,
                HEAD_OFF=0, HQ=28)
    consts = dict(HAS_CTX=has_ctx, CTX_PAGED=paged, CTX_CU=ctx_cu, CTX_LENS=False, HAS_CUR=has_cur, CUR_CU=q_cu,
                  CUR_LENS=cur_lens, Q_CU=q_cu, NUM_STAGES=ag.STAGES, SCHEDULE=schedule,
                  PACK_G=7, num_warps=4)
    return compile_for_hopper(ag._attn_fwd_ws, args, consts, 4, ag.MAXNREG)


def _build_report() -> list[dict]:
    return [{"variant": v, **ptx_facts(_compile_for_hopper(*v))} for v in BUILD_VARIANTS]


def test_gluon_attention_builds_for_hopper():
    """Every variant the model launches compiles to sm_90a with TMA, warp-specialized wgmma, and fits shared memory
    (built in a fresh process without the interpreter: see hopper_build)."""
    report = report_from_child(__file__)
    assert len(report) == len(BUILD_VARIANTS)
    for r in report:
        assert r["sm_90a"] and r["wgmma"] and r["setmaxnreg"] and r["tma"], r
        assert r["shared"] <= 227 * 1024, r


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    or torch.cuda.get_device_capability()[0] != 9,
    reason="needs a Hopper GPU and compiled kernels: TRITON_INTERPRET=0 pytest ... on the GPU")


def _both(q, segs, schedule="auto", **kw):
    """(Triton kernel, Gluon kernel) results of one call, each into a NaN-poisoned output buffer."""
    return [bk.joint_attention(q, segs, out=torch.full_like(q, float("nan")), **kw,
                               options=bk.KernelOptions(backend=backend, attention_schedule=schedule))
            for backend in ("triton", "gluon")]


@needs_hopper
@pytest.mark.parametrize("nq,nctx,pad", [(1, 0, 0), (17, 1, 5), (300, 130, 200), (4098, 1057, 0), (1026, 64, 0),
                                         (700, 300, 3)])
@pytest.mark.parametrize("layout", [None, "flash_attn", "flashinfer_hnd"])
@pytest.mark.parametrize("schedule", ["segment", "chained"])
def test_gluon_output_and_lse_are_the_triton_kernels_bits(nq, nctx, pad, layout, schedule):
    """Every key-block schedule (an issue order) gives the Triton kernel's bits."""
    g = torch.Generator(device="cuda").manual_seed(nq + nctx)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    q, k, v = rnd(nq, 28, 128), rnd(nq + pad, 4, 128), rnd(nq + pad, 4, 128)
    k[nq:] = v[nq:] = float("nan")  # padding rows past seqlens must contribute exactly nothing
    segs = [bk.ContiguousKV(k, v, seqlens=torch.tensor([nq], dtype=torch.int32, device="cuda"))]
    if nctx:
        ck, cv = rnd(nctx, 4, 128), rnd(nctx, 4, 128)
        if layout is None:
            segs.insert(0, bk.ContiguousKV(ck, cv))
        else:
            pages = -(-nctx // 16)
            view = bk.normalize_kv_cache(bk.allocate_kv_cache(layout, pages + 2, 16, 4, 128, torch.bfloat16, "cuda"),
                                         layout)
            view.k.fill_(float("nan"))  # unwritten slots of the last page
            view.v.fill_(float("nan"))
            table = torch.randperm(pages + 2, device="cuda")[:pages].to(torch.int32)[None]
            bk.kv_layout.write_tokens(view, table[0], 0, ck, cv)
            segs.insert(0, bk.PagedKV(view.k, view.v, table, torch.tensor([nctx], dtype=torch.int32, device="cuda")))
    assert ag.gluon_attention_supported(q, segs, None, None, True, None)
    tri, glu = _both(q, segs, schedule)
    assert torch.equal(glu.out, tri.out) and torch.equal(glu.lse, tri.lse)
    assert not torch.isnan(glu.out).any()


@needs_hopper
def test_gluon_varlen_cfg_branches_equal_each_branch_alone():
    """Three CFG branches in one launch: each branch's rows are the bits of that branch launched alone."""
    g = torch.Generator(device="cuda").manual_seed(3)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    lens, ctxs = [1000, 333, 517], [64, 0, 200]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    ccu = torch.tensor([0, *torch.tensor(ctxs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = rnd(1850, 28, 128), rnd(1850, 4, 128), rnd(1850, 4, 128)
    ck, cv = rnd(264, 4, 128), rnd(264, 4, 128)
    segs = [bk.ContiguousKV(ck, cv, cu_seqlens=ccu, max_seqlen=200), bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=1000)]
    assert ag.gluon_attention_supported(q, segs, None, None, True, None)
    tri, glu = _both(q, segs, cu_seqlens_q=cu, max_seqlen_q=1000)
    assert torch.equal(glu.out, tri.out) and torch.equal(glu.lse, tri.lse)
    for b in range(3):
        a, e = cu[b].item(), cu[b + 1].item()
        c0, c1 = ccu[b].item(), ccu[b + 1].item()
        alone = [bk.ContiguousKV(k[a:e], v[a:e])]
        if c1 > c0:
            alone.insert(0, bk.ContiguousKV(ck[c0:c1], cv[c0:c1]))
        one = bk.joint_attention(q[a:e], alone)
        assert torch.equal(one.out, glu.out[a:e])


if __name__ == "__main__":  # the build check's child process (see test_gluon_attention_builds_for_hopper)
    import json

    print(json.dumps(_build_report()))


@needs_hopper
def test_gluon_nan_key_surfaces_as_nan_like_the_triton_kernel():
    """A NaN in a context key makes every row that attends to it NaN in both kernels (never a silent 0); rows of
    the other KV heads keep finite values."""
    g = torch.Generator(device="cuda").manual_seed(11)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)  # noqa: E731
    q, k, v = rnd(300, 28, 128), rnd(300, 4, 128), rnd(300, 4, 128)
    ck, cv = rnd(130, 4, 128), rnd(130, 4, 128)
    ck[70, 1, 5] = float("nan")  # context key 70 of KV head 1: query heads 7..13 see it from every row
    segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
    assert ag.gluon_attention_supported(q, segs, None, None, True, None)
    for res in _both(q, segs):
        assert torch.isnan(res.out[:, 7:14]).all() and torch.isnan(res.lse[:, 7:14]).all()
        assert torch.isfinite(res.out[:, :7]).all() and torch.isfinite(res.out[:, 14:]).all()
