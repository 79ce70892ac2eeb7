"""joint_attention, both backends (Triton under the interpreter on CPU), against a float64 dense reference."""
import math

import pytest
import torch

import bagel_kernels as bk
from bagel_kernels import KernelOptions
from bagel_kernels.attention_reference import REF_BLOCK_N, naive_attention
from bagel_kernels.attention_triton import TRITON_BLOCK_M, TRITON_BLOCK_N

BACKENDS = ["reference", "triton"]
BLOCK_N = {"reference": REF_BLOCK_N, "triton": TRITON_BLOCK_N}
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rnd(*shape, dtype=torch.float32, seed=None, gen=None):
    g = gen or torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def rel_err(got, want):
    assert not torch.isnan(got).any(), "NaN in output"
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,hq,hkv", [(16, 6, 2), (64, 4, 2), (128, 7, 1), (64, 3, 3)])
@pytest.mark.parametrize("nq,nctx", [(1, 0), (17, 5), (130, 70)])
def test_matches_dense_reference(backend, dtype, d, hq, hkv, nq, nctx):
    g = torch.Generator().manual_seed(nq * 1000 + nctx + d)
    q, k, v = rnd(nq, hq, d, dtype=dtype, gen=g), rnd(nq, hkv, d, dtype=dtype, gen=g), rnd(nq, hkv, d, dtype=dtype, gen=g)
    ck, cv = rnd(nctx, hkv, d, dtype=dtype, gen=g), rnd(nctx, hkv, d, dtype=dtype, gen=g)
    segs = ([bk.ContiguousKV(ck, cv)] if nctx else []) + [bk.ContiguousKV(k, v)]
    out = torch.full_like(q, float("nan"))  # poison: every element must be written
    res = bk.joint_attention(q, segs, options=KernelOptions(backend=backend), out=out)
    want = naive_attention(q, torch.cat([ck, k]), torch.cat([cv, v]))
    assert res.out is out and torch.isfinite(out).all()
    assert rel_err(out, want) < TOL[dtype]
    lse_want = torch.logsumexp(torch.einsum("qhd,khd->hqk", q.double(), torch.cat([ck, k]).double()
                                            .repeat_interleave(hq // hkv, 1)) / math.sqrt(d), -1).T
    assert torch.allclose(res.lse.double(), lse_want, rtol=1e-3, atol=1e-3)


def _paged(k, v, layout, block_size, gen):
    """Store per-sequence K/V lists in a paged cache of ``layout`` with a shuffled block table."""
    lens = [x.shape[0] for x in k]
    pages_per = [max(1, -(-n // block_size)) for n in lens]
    nb = sum(pages_per) + 3
    perm = torch.randperm(nb, generator=gen)
    table = torch.zeros(len(k), max(pages_per), dtype=torch.int32)
    raw = bk.allocate_kv_cache(layout, nb, block_size, k[0].shape[1], k[0].shape[2], dtype=k[0].dtype)
    view = bk.normalize_kv_cache(raw, layout)
    view.k.copy_(torch.randn(view.k.shape, generator=gen).to(view.k.dtype) * 1e3)  # garbage outside the sequences
    view.v.copy_(torch.randn(view.v.shape, generator=gen).to(view.v.dtype) * 1e3)
    i = 0
    for b, (kb, vb) in enumerate(zip(k, v)):
        table[b, :pages_per[b]] = perm[i:i + pages_per[b]].to(torch.int32)
        i += pages_per[b]
        bk.kv_layout.write_tokens(view, table[b], 0, kb, vb)
    return bk.PagedKV(view.k, view.v, table, torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", bk.LAYOUTS)
def test_varlen_batch_with_paged_context(backend, layout):
    """Three sequences (like the three CFG branches): different query and context lengths, one launch."""
    g = torch.Generator().manual_seed(7)
    hq, hkv, d = 4, 2, 32
    qlens, clens = [19, 5, 33], [40, 0, 7]
    qs = [rnd(n, hq, d, gen=g) for n in qlens]
    ks = [rnd(n, hkv, d, gen=g) for n in qlens]
    vs = [rnd(n, hkv, d, gen=g) for n in qlens]
    cks = [rnd(n, hkv, d, gen=g) for n in clens]
    cvs = [rnd(n, hkv, d, gen=g) for n in clens]
    paged = _paged(cks, cvs, layout, 16, g)
    cu = torch.tensor([0, 19, 24, 57], dtype=torch.int32)
    cur = bk.ContiguousKV(torch.cat(ks), torch.cat(vs), cu_seqlens=cu, max_seqlen=33)
    res = bk.joint_attention(torch.cat(qs), [paged, cur], cu_seqlens_q=cu, max_seqlen_q=33, options=KernelOptions(backend=backend))
    for b in range(3):
        want = naive_attention(qs[b], torch.cat([cks[b], ks[b]]), torch.cat([cvs[b], vs[b]]))
        assert rel_err(res.out[cu[b]:cu[b + 1]], want) < 1e-4


def test_layout_views_do_not_copy():
    raw = bk.allocate_kv_cache("flashinfer_hnd", 4, 8, 2, 16)
    view = bk.normalize_kv_cache(raw, "flashinfer_hnd")
    assert view.k.data_ptr() == raw.data_ptr() and view.k.shape == (4, 8, 2, 16)
    with pytest.raises(ValueError, match="unknown KV-cache layout 'vllm_v9'"):
        bk.normalize_kv_cache(raw, "vllm_v9")
    with pytest.raises(ValueError, match="does not match layout 'flash_attn'"):
        bk.normalize_kv_cache(raw, "flash_attn")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nctx", [0, 9])
def test_prefill_mask_causal_text_bidirectional_images(backend, nctx):
    g = torch.Generator().manual_seed(3)
    span = torch.tensor([-1] * 5 + [0] * 20 + [-1] * 3 + [1] * 70 + [-1] * 4, dtype=torch.int32)
    n, hq, hkv, d = span.shape[0], 4, 2, 32
    q, k, v = rnd(n, hq, d, gen=g), rnd(n, hkv, d, gen=g), rnd(n, hkv, d, gen=g)
    ck, cv = rnd(nctx, hkv, d, gen=g), rnd(nctx, hkv, d, gen=g)
    vis = bk.prefill_visible_end(span)
    dense = torch.arange(n)[None, :] < vis[:, None].long()
    mask = torch.cat([torch.ones(n, nctx, dtype=torch.bool), dense], 1)
    segs = ([bk.ContiguousKV(ck, cv)] if nctx else []) + [bk.ContiguousKV(k, v)]
    res = bk.joint_attention(q, segs, visible_end=vis, options=KernelOptions(backend=backend))
    want = naive_attention(q, torch.cat([ck, k]), torch.cat([cv, v]), mask=mask)
    assert rel_err(res.out, want) < 1e-4
    assert vis[5:25].eq(25).all() and vis[:5].tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_resumable_launches_equal_one_launch_bitwise(backend):
    """Exact ring attention: context, then current-token chunks at multiples of the KV block, state carried."""
    g = torch.Generator().manual_seed(11)
    hq, hkv, d, n, bn = 6, 2, 32, 3 * BLOCK_N[backend] + 5, BLOCK_N[backend]
    q, k, v = rnd(50, hq, d, gen=g), rnd(n, hkv, d, gen=g), rnd(n, hkv, d, gen=g)
    ck, cv = rnd(23, hkv, d, gen=g), rnd(23, hkv, d, gen=g)
    ctx = bk.ContiguousKV(ck, cv)
    one = bk.joint_attention(q, [ctx, bk.ContiguousKV(k, v)], options=KernelOptions(backend=backend))
    state = bk.joint_attention(q, [ctx], options=KernelOptions(backend=backend), finalize=False)
    bounds = [0, bn, 3 * bn, n]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        last = i == len(bounds) - 2
        r = bk.joint_attention(q, [bk.ContiguousKV(k[a:b], v[a:b])], options=KernelOptions(backend=backend), state=state, finalize=last)
        state = r
    assert torch.equal(r.out, one.out) and torch.equal(r.lse, one.lse)
    # one launch over three segments (chained internally) is also the same
    many = bk.joint_attention(q, [ctx, bk.ContiguousKV(k[:bn], v[:bn]), bk.ContiguousKV(k[bn:], v[bn:])], options=KernelOptions(backend=backend))
    assert torch.equal(many.out, one.out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_keys_leave_results_bit_identical(backend):
    g = torch.Generator().manual_seed(5)
    q, k, v = rnd(40, 4, 32, gen=g), rnd(37, 2, 32, gen=g), rnd(37, 2, 32, gen=g)
    pad = 2 * BLOCK_N[backend] + 11
    kp = torch.cat([k, torch.zeros(pad, 2, 32)])
    vp = torch.cat([v, torch.zeros(pad, 2, 32)])
    base = bk.joint_attention(q, [bk.ContiguousKV(k, v)], options=KernelOptions(backend=backend))
    padded = bk.joint_attention(q, [bk.ContiguousKV(kp, vp, seqlens=torch.tensor([37], dtype=torch.int32))], options=KernelOptions(backend=backend))
    assert torch.equal(base.out, padded.out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subsets_of_heads_sequences_and_rows_are_bitwise_invariant(backend):
    g = torch.Generator().manual_seed(9)
    hq, hkv, d = 6, 2, 32  # GQA 3
    rows = 2 * TRITON_BLOCK_M + 30
    q, k, v = rnd(rows, hq, d, gen=g), rnd(rows, hkv, d, gen=g), rnd(rows, hkv, d, gen=g)
    ck, cv = rnd(21, hkv, d, gen=g), rnd(21, hkv, d, gen=g)
    full = bk.joint_attention(q, [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)], options=KernelOptions(backend=backend)).out
    # heads 2..4 (crossing a KV-head boundary) with only the KV heads they need
    part = bk.joint_attention(q[:, 2:5].contiguous(), [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)],
                              gqa_group=3, q_head_offset=2, options=KernelOptions(backend=backend)).out
    assert torch.equal(part, full[:, 2:5])
    # an aligned block of query rows in a smaller launch
    sub = slice(TRITON_BLOCK_M, 2 * TRITON_BLOCK_M)
    rows_only = bk.joint_attention(q[sub].contiguous(), [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)], options=KernelOptions(backend=backend)).out
    assert torch.equal(rows_only, full[sub])
    # the same sequence alone vs inside a varlen batch with another sequence in front
    q2, k2, v2 = rnd(13, hq, d, gen=g), rnd(13, hkv, d, gen=g), rnd(13, hkv, d, gen=g)
    cu = torch.tensor([0, 13, 13 + rows], dtype=torch.int32)
    ccu = torch.tensor([0, 0, 21], dtype=torch.int32)
    batch = bk.joint_attention(torch.cat([q2, q]), [bk.ContiguousKV(ck, cv, cu_seqlens=ccu),
                                                  bk.ContiguousKV(torch.cat([k2, k]), torch.cat([v2, v]), cu_seqlens=cu)],
                               cu_seqlens_q=cu, max_seqlen_q=rows, options=KernelOptions(backend=backend)).out
    assert torch.equal(batch[13:], full)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_with_no_visible_key_is_zero_not_nan(backend):
    q, k, v = rnd(3, 2, 16, seed=1), rnd(4, 2, 16, seed=2), rnd(4, 2, 16, seed=3)
    res = bk.joint_attention(q, [bk.ContiguousKV(k, v)], visible_end=torch.tensor([0, 1, 4], dtype=torch.int32),
                             options=KernelOptions(backend=backend))
    assert torch.equal(res.out[0], torch.zeros(2, 16)) and torch.isneginf(res.lse[0]).all()
    assert torch.isfinite(res.out).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", ["k", "v"])
def test_nan_key_or_value_surfaces_as_nan_in_rows_that_see_it(backend, poison):
    """As SDPA: a NaN key or value that a row attends to makes that row NaN, never a silent 0. A NaN key is masked
    out of the rows that cannot see it (their bits are kept); a masked NaN value may reach them (0 * NaN), as in SDPA."""
    q, k, v = rnd(5, 2, 16, seed=1), rnd(5, 2, 16, seed=2), rnd(5, 2, 16, seed=3)
    causal = torch.arange(1, 6, dtype=torch.int32)  # row i sees keys 0..i
    clean = bk.joint_attention(q, [bk.ContiguousKV(k, v)], visible_end=causal, options=KernelOptions(backend=backend))
    bad = {"k": k.clone(), "v": v.clone()}
    bad[poison][2, 0] = float("nan")  # key 2, KV head 0
    res = bk.joint_attention(q, [bk.ContiguousKV(bad["k"], bad["v"])], visible_end=causal, options=KernelOptions(backend=backend))
    assert torch.isnan(res.out[2:, 0]).all()
    assert torch.equal(res.out[:, 1], clean.out[:, 1])  # the other KV head's query heads
    if poison == "k":
        assert torch.equal(res.out[:2], clean.out[:2])


def test_bad_inputs_are_named():
    q, k = torch.randn(4, 6, 16), torch.randn(4, 4, 16)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        bk.joint_attention(q, [bk.ContiguousKV(k, k)])
    with pytest.raises(ValueError, match="head_dim 8 does not match"):
        bk.joint_attention(q, [bk.ContiguousKV(torch.randn(4, 2, 8), torch.randn(4, 2, 8))])
    with pytest.raises(TypeError, match="dtype"):
        bk.joint_attention(q, [bk.ContiguousKV(k.bfloat16()[:, :2], k.bfloat16()[:, :2])])
    with pytest.raises(ValueError, match="must be \\(tokens, heads, head_dim\\)"):
        bk.joint_attention(q[0], [bk.ContiguousKV(k, k)])
    with pytest.raises(ValueError, match="need KV heads"):
        bk.joint_attention(q, [bk.ContiguousKV(k[:, :1], k[:, :1])], gqa_group=3)
    with pytest.raises(ValueError, match="at least one KV segment"):
        bk.joint_attention(q, [])
    with pytest.raises(ValueError, match="unknown kernel backend"):
        bk.joint_attention(q, [bk.ContiguousKV(k[:, :2], k[:, :2])], options=KernelOptions(backend="cudnn"))
    with pytest.raises(ValueError, match="scale must be positive"):
        bk.joint_attention(q, [bk.ContiguousKV(k[:, :2], k[:, :2])], scale=-1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_and_pointer_reads_give_the_same_bits(dtype):
    """Full blocks of the current tokens go through TMA descriptors when the storage allows (heads adjacent,
    16-byte aligned rows) and through pointers otherwise; the numbers read are the same, so are the bits."""
    g = torch.Generator().manual_seed(11)
    n, hq, hkv, d = 2 * TRITON_BLOCK_N + 9, 4, 2, 32
    q = rnd(n, hq, d, dtype=dtype, gen=g)
    fused = rnd(n, hq + 2 * hkv, d, dtype=dtype, gen=g)  # q|k|v rows of one projection: strided, TMA-able
    k, v = fused[:, hq:hq + hkv], fused[:, hq + hkv:]
    ctx = bk.ContiguousKV(rnd(40, hkv, d, dtype=dtype, gen=g), rnd(40, hkv, d, dtype=dtype, gen=g))
    from bagel_kernels.attention_triton import _tma_mode

    assert _tma_mode(bk.ContiguousKV(k, v), d)
    want = bk.joint_attention(q, [ctx, bk.ContiguousKV(k, v)], options=KernelOptions(backend="triton")).out
    # heads not adjacent (head-major storage): the pointer path
    k_hm = k.transpose(0, 1).contiguous().transpose(0, 1)
    v_hm = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not _tma_mode(bk.ContiguousKV(k_hm, v_hm), d)
    assert torch.equal(bk.joint_attention(q, [ctx, bk.ContiguousKV(k_hm, v_hm)], options=KernelOptions(backend="triton")).out, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [40, 72])
def test_head_dims_that_are_not_powers_of_two(backend, d):
    g = torch.Generator().manual_seed(d)
    n, hq, hkv = TRITON_BLOCK_N + 3, 4, 2
    q, k, v = rnd(n, hq, d, gen=g), rnd(n, hkv, d, gen=g), rnd(n, hkv, d, gen=g)
    ck, cv = rnd(TRITON_BLOCK_N, hkv, d, gen=g), rnd(TRITON_BLOCK_N, hkv, d, gen=g)
    out = bk.joint_attention(q, [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)], options=KernelOptions(backend=backend)).out
    assert rel_err(out, naive_attention(q, torch.cat([ck, k]), torch.cat([cv, v]))) < TOL[torch.float32]
