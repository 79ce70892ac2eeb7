"""MoT-routed kernels (routed GEMM, routed RMSNorm, QK-norm + RoPE) against their plain-torch references, and the
batch-invariance the exactness contract needs: a row's bits never depend on which other rows share the launch."""
import pytest
import torch

import bagel_kernels as bk
from bagel_kernels import KernelOptions
from bagel_kernels.routed_gemm_triton import gemm_config

BACKENDS = ["reference", "triton"]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.5e-2}


def rnd(*shape, dtype=torch.float32, gen=None, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output"
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def routing_for(kind: str, m: int) -> bk.ExpertSegments:
    if kind == "und":
        return bk.ExpertSegments.uniform(m, False)
    if kind == "gen":
        return bk.ExpertSegments.uniform(m, True)
    # mixed: runs of different lengths, crossing tile boundaries (text, image, text...)
    return bk.ExpertSegments.from_flags([(i % 37) >= 11 for i in range(m)])


def float64_routed(x, routing, w, b, swiglu, residual):
    """Per-row float64 truth for routed_linear."""
    ids = routing.expert_ids("cpu").long()
    xd = x.double()
    out = []
    for p in range(w.shape[1]):
        y = torch.einsum("mk,mnk->mn", xd, w.double()[ids, p])
        if b is not None:
            y = y + b.double()[ids, p]
        out.append(y)
    y = torch.nn.functional.silu(out[0]) * out[1] if swiglu else out[0]
    return y if residual is None else y + residual.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("kind", ["und", "gen", "mixed"])
@pytest.mark.parametrize("swiglu,bias,residual", [(False, True, False), (True, False, False), (False, False, True)])
def test_routed_linear_matches_float64(backend, dtype, m, kind, swiglu, bias, residual):
    g = torch.Generator().manual_seed(m * 7 + len(kind))
    k, n = 96, 160
    x = rnd(m, k, dtype=dtype, gen=g)
    w = rnd(2, 2 if swiglu else 1, n, k, dtype=dtype, gen=g, scale=0.1)
    b = rnd(2, 1, n, dtype=dtype, gen=g) if bias else None
    res = rnd(m, n, dtype=dtype, gen=g) if residual else None
    r = routing_for(kind, m)
    got = bk.routed_linear(x, r, w, b, activation="swiglu" if swiglu else None, residual=res, options=KernelOptions(backend=backend))
    assert got.shape == (m, n) and got.dtype == dtype
    assert rel_err(got, float64_routed(x, r, w, b, swiglu, res)) < TOL[dtype]


def i2i_routing(m: int) -> bk.ExpertSegments:
    """img2img prefill's shape: text, image, text — the und expert in two runs."""
    return bk.ExpertSegments.from_flags([m // 5 <= i < m - m // 4 for i in range(m)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 17, 300])
@pytest.mark.parametrize("kind", ["und", "gen", "mixed", "i2i", "none"])
@pytest.mark.parametrize("swiglu,bias,residual", [(False, True, False), (True, True, False), (False, False, True),
                                                  (False, True, True), (True, False, True), (False, False, False)])
def test_fast_mode_cublas_path_matches_float64(dtype, m, kind, swiglu, bias, residual):
    """Fast mode's one-GEMM-per-expert path (gather the runs of an expert, scatter back) is the routed projection."""
    from bagel_kernels.routed_gemm_cublas import routed_gemm_cublas

    g = torch.Generator().manual_seed(m * 11 + len(kind))
    k, n, e = 96, 160, (1 if kind == "none" else 2)
    x = rnd(m, k, dtype=dtype, gen=g)
    w = rnd(e, 2 if swiglu else 1, n, k, dtype=dtype, gen=g, scale=0.1)
    b = rnd(e, 2 if swiglu else 1, n, dtype=dtype, gen=g) if bias else None
    res = rnd(m, n, dtype=dtype, gen=g) if residual else None
    r = None if kind == "none" else (i2i_routing(m) if kind == "i2i" else routing_for(kind, m))
    got = routed_gemm_cublas(x, r, w, b, swiglu, res)
    assert got.shape == (m, n) and got.dtype == dtype
    truth = float64_routed(x, r or bk.ExpertSegments.uniform(m, False), w, b, swiglu, res)
    assert rel_err(got, truth) < TOL[dtype]


def test_fast_mode_reads_each_expert_weight_once():
    """The und rows of a text/image/text prefill are one GEMM, not one per text run."""
    from bagel_kernels.routed_gemm_cublas import expert_runs

    assert expert_runs(i2i_routing(100), 100) == {0: [(0, 20), (75, 100)], 1: [(20, 75)]}
    assert expert_runs(None, 7) == {0: [(0, 7)]}
    assert expert_runs(bk.ExpertSegments.uniform(0, True), 0) == {}


def test_fast_mode_calls_cublas_where_it_wins():
    from bagel_kernels.routed_linear import fast_mode_uses_cublas

    assert fast_mode_uses_cublas(None, False, 4608, 3584, gluon=True)  # qkv (+bias)
    assert not fast_mode_uses_cublas(None, True, 3584, 3584, gluon=True)  # o_proj + residual
    assert not fast_mode_uses_cublas("swiglu", False, 18944, 3584, gluon=True)  # gate/up
    assert fast_mode_uses_cublas(None, True, 3584, 18944, gluon=True)  # down + residual
    assert fast_mode_uses_cublas("swiglu", True, 3584, 3584, gluon=False)  # no Hopper: cuBLAS everywhere


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fast mode's cuBLAS path runs on CUDA")
@pytest.mark.parametrize("swiglu,residual,k", [(False, False, 256), (False, True, 256), (False, True, 512),
                                               (True, False, 256)])
def test_fast_mode_on_gpu_matches_float64_without_host_sync(swiglu, residual, k):
    g = torch.Generator(device="cuda").manual_seed(3)
    m, n = 700, 384
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2, 2 if swiglu else 1, n, k, device="cuda", generator=g) * 0.05).bfloat16()
    b = None if residual else torch.randn(2, 2 if swiglu else 1, n, device="cuda", generator=g).bfloat16()
    res = torch.randn(m, n, device="cuda", generator=g).bfloat16() if residual else None
    r = i2i_routing(m)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = bk.routed_linear(x, r, w, b, activation="swiglu" if swiglu else None, residual=res, options=KernelOptions(mode="fast"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert rel_err(got.cpu(), float64_routed(x.cpu(), r, w.cpu(), None if b is None else b.cpu(), swiglu,
                                             None if res is None else res.cpu())) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("kind", ["und", "gen", "mixed"])
@pytest.mark.parametrize("swiglu,bias,residual", [(False, True, False), (True, True, False), (False, False, True)])
def test_small_batch_kernel_matches_float64(dtype, m, kind, swiglu, bias, residual):
    """The AR-decode GEMM (at most 16 rows, split over N): same contract as the large kernel, K not a multiple of
    its K step, N not a multiple of its N tile."""
    g = torch.Generator().manual_seed(m * 11 + len(kind))
    k, n = 300, 72
    x = rnd(m, k, dtype=dtype, gen=g)
    w = rnd(2, 2 if swiglu else 1, n, k, dtype=dtype, gen=g, scale=0.1)
    b = rnd(2, 2 if swiglu else 1, n, dtype=dtype, gen=g) if bias else None
    res = rnd(m, n, dtype=dtype, gen=g) if residual else None
    r = routing_for(kind, m)
    act = "swiglu" if swiglu else None
    got = bk.routed_linear(x, r, w, b, activation=act, residual=res, options=KernelOptions(backend="triton"), small_batch=True)
    assert got.shape == (m, n) and got.dtype == dtype
    # bf16 SwiGLU rounds gate, silu(gate), up and the product (eager's roundings): with one row nothing averages
    # those out, so its bound is wider
    tol = 3e-2 if swiglu and dtype == torch.bfloat16 else TOL[dtype]
    assert rel_err(got, float64_routed(x, r, w, b, swiglu, res)) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_batch_rows_are_batch_invariant_among_themselves(dtype):
    g = torch.Generator().manual_seed(5)
    x, w = rnd(16, 200, dtype=dtype, gen=g), rnd(2, 2, 40, 200, dtype=dtype, gen=g, scale=0.1)
    r = routing_for("mixed", 16)
    full = bk.routed_linear(x, r, w, activation="swiglu", options=KernelOptions(backend="triton"), small_batch=True)
    for a, c in ((0, 1), (3, 9), (15, 16)):
        part = bk.routed_linear(x[a:c], r.slice(a, c), w, activation="swiglu", options=KernelOptions(backend="triton"), small_batch=True)
        assert torch.equal(part, full[a:c])
    # more than 16 rows is the large kernel's job, whatever the flag says
    big = torch.cat([x, x[:3]])
    rb = bk.ExpertSegments.from_flags([g_ for s, e, g_ in r.segments for _ in range(s, e)] + [False] * 3)
    assert torch.equal(bk.routed_linear(big, rb, w, activation="swiglu", options=KernelOptions(backend="triton"), small_batch=True),
                       bk.routed_linear(big, rb, w, activation="swiglu", options=KernelOptions(backend="triton")))


def test_routed_linear_at_bagel_token_count():
    """M = 4098 (a 1024² image's latents + markers) with mixed routing: every row, every tile of the persistent loop."""
    g = torch.Generator().manual_seed(1)
    m, k, n = 4098, 32, 48
    x, w = rnd(m, k, dtype=torch.bfloat16, gen=g), rnd(2, 1, n, k, dtype=torch.bfloat16, gen=g, scale=0.2)
    r = routing_for("mixed", m)
    got = bk.routed_linear(x, r, w, options=KernelOptions(backend="triton"))
    want = bk.routed_linear(x, r, w, options=KernelOptions(backend="reference"))
    assert rel_err(got, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("swiglu", [False, True])
def test_routed_linear_rows_are_batch_invariant(dtype, swiglu):
    """Any row subset — a rank's token chunk, one row, one expert's rows — gives bitwise the full launch's rows."""
    g = torch.Generator().manual_seed(2)
    m, k, n = 300, 96, 160
    x = rnd(m, k, dtype=dtype, gen=g)
    w = rnd(2, 2 if swiglu else 1, n, k, dtype=dtype, gen=g, scale=0.1)
    r = routing_for("mixed", m)
    act = "swiglu" if swiglu else None
    full = bk.routed_linear(x, r, w, activation=act, options=KernelOptions(backend="triton"))
    for a, b in [(0, 1), (5, 6), (3, 150), (130, 300), (11, 37), (200, 201)]:
        part = bk.routed_linear(x[a:b], r.slice(a, b), w, activation=act, options=KernelOptions(backend="triton"))
        assert torch.equal(part, full[a:b]), f"rows [{a}, {b}) differ from the full launch"


def test_routed_linear_one_expert_rows_equal_dense():
    """Rows routed to one expert are bitwise the dense (one-expert) GEMM with that expert's weight."""
    g = torch.Generator().manual_seed(3)
    x, w = rnd(150, 96, dtype=torch.bfloat16, gen=g), rnd(2, 1, 64, 96, dtype=torch.bfloat16, gen=g, scale=0.1)
    r = routing_for("mixed", 150)
    routed = bk.routed_linear(x, r, w, options=KernelOptions(backend="triton"))
    und = bk.invariant_linear(x, w[0, 0], options=KernelOptions(backend="triton"))
    gen = bk.invariant_linear(x, w[1, 0], options=KernelOptions(backend="triton"))
    ids = r.expert_ids("cpu").bool()
    assert torch.equal(routed[~ids], und[~ids]) and torch.equal(routed[ids], gen[ids])


def test_gemm_config_depends_on_weight_shape_only():
    assert gemm_config(4608, 3584, torch.bfloat16, False) == gemm_config(4608, 3584, torch.bfloat16, False)
    assert gemm_config(4608, 3584, torch.bfloat16, False).BLOCK_M == 128
    import inspect
    assert "m" not in inspect.signature(gemm_config).parameters


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,h", [(1, 96), (17, 3584), (130, 100)])
def test_routed_rms_norm(backend, dtype, m, h):
    g = torch.Generator().manual_seed(m + h)
    x, w = rnd(m, h, dtype=dtype, gen=g), rnd(2, h, dtype=dtype, gen=g)
    r = routing_for("mixed", m)
    got = bk.routed_rms_norm(x, r, w, 1e-6, options=KernelOptions(backend=backend))
    ids = r.expert_ids("cpu").long()
    xd = x.double()
    want = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()[ids]
    assert rel_err(got, want) < TOL[dtype]
    if backend == "triton":
        part = bk.routed_rms_norm(x[m // 2:], r.slice(m // 2, m), w, 1e-6, options=KernelOptions(backend=backend))
        assert torch.equal(part, got[m // 2:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp32_math", [True, False])
@pytest.mark.parametrize("d,hq,hkv", [(16, 6, 2), (128, 28, 4), (64, 7, 1)])
def test_qk_norm_rope_matches_reference(dtype, fp32_math, d, hq, hkv):
    g = torch.Generator().manual_seed(d + hq)
    m = 19
    qkv = rnd(m, (hq + 2 * hkv) * d, dtype=dtype, gen=g)
    qn, kn = rnd(2, d, dtype=dtype, gen=g), rnd(2, d, dtype=dtype, gen=g)
    cos, sin = bk.rope_cos_sin(torch.arange(m) * 3 + 7, d, 1e6)
    r = routing_for("mixed", m)
    args = (qkv, r, qn, kn, cos, sin, hq, hkv, 1e-6, fp32_math)
    got = bk.qk_norm_rope(*args, options=KernelOptions(backend="triton"))
    want = bk.qk_norm_rope(*args, options=KernelOptions(backend="reference"))
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.is_contiguous() and a.dtype == dtype
        assert rel_err(a, b) < TOL[dtype], name
    assert torch.equal(got[2], want[2])  # v is copied, untouched
    part = bk.qk_norm_rope(qkv[5:], r.slice(5, m), qn, kn, cos[5:], sin[5:], hq, hkv, 1e-6, fp32_math,
                           options=KernelOptions(backend="triton"))
    assert all(torch.equal(p, f[5:]) for p, f in zip(part, got))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", bk.LAYOUTS)
def test_qk_norm_rope_writes_k_and_v_into_the_paged_cache(backend, layout):
    """``kv_out``: the kernel also stores each row's k and v at its (page, slot) of a paged cache in any layout,
    cast to the cache's dtype — exactly what ``write_token_slots`` writes from the returned k and v — and touches
    nothing else; q, k, v are returned unchanged."""
    from bagel_kernels.kv_layout import TokenSlots, write_token_slots

    g = torch.Generator().manual_seed(11)
    d, hq, hkv, m, nb, bs = 16, 6, 2, 5, 4, 4
    qkv = rnd(m, (hq + 2 * hkv) * d, dtype=torch.bfloat16, gen=g)
    qn, kn = rnd(2, d, dtype=torch.bfloat16, gen=g), rnd(2, d, dtype=torch.bfloat16, gen=g)
    cos, sin = bk.rope_cos_sin(torch.arange(m) + 40, d, 1e6)
    r = routing_for("mixed", m)
    pages, slots = torch.tensor([3, 0, 2, 2, 1]), torch.tensor([1, 3, 0, 2, 3])
    opts = KernelOptions(backend=backend)
    args = (qkv, r, qn, kn, cos, sin, hq, hkv, 1e-6, True)
    want = bk.qk_norm_rope(*args, options=opts)
    for dtype in (torch.bfloat16, torch.float32):  # a cache wider than the activations gets the exact widening
        cache = bk.allocate_kv_cache(layout, nb, bs, hkv, d, dtype)
        view = bk.normalize_kv_cache(cache, layout)
        got = bk.qk_norm_rope(*args, options=opts, kv_out=TokenSlots(view, pages, slots))
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        ref = bk.normalize_kv_cache(bk.allocate_kv_cache(layout, nb, bs, hkv, d, dtype), layout)
        write_token_slots(ref, pages, slots, want[1], want[2])
        assert torch.equal(view.k, ref.k) and torch.equal(view.v, ref.v)
    with pytest.raises(ValueError, match="one page and one slot per row"):
        bk.qk_norm_rope(*args, options=opts, kv_out=TokenSlots(view, pages[:3], slots[:3]))
    with pytest.raises(ValueError, match="cache views must be"):
        bad = bk.normalize_kv_cache(bk.allocate_kv_cache(layout, nb, bs, hkv + 1, d), layout)
        bk.qk_norm_rope(*args, options=opts, kv_out=TokenSlots(bad, pages, slots))


def test_bad_inputs_are_named():
    x, w = torch.randn(4, 8), torch.randn(2, 1, 6, 8)
    r = bk.ExpertSegments.uniform(4, True)
    with pytest.raises(ValueError, match="input must be"):
        bk.routed_linear(torch.randn(4, 9), r, w)
    with pytest.raises(TypeError, match="dtype"):
        bk.routed_linear(x.bfloat16(), r, w)
    with pytest.raises(ValueError, match="routing covers 3 rows"):
        bk.routed_linear(x, bk.ExpertSegments.uniform(3, True), w)
    with pytest.raises(ValueError, match="weight parts"):
        bk.routed_linear(x, r, w, activation="swiglu")
    with pytest.raises(ValueError, match="one expert"):
        bk.routed_linear(x, r, w[:1])
    with pytest.raises(ValueError, match="needs a routing"):
        bk.routed_linear(x, None, w)
    with pytest.raises(ValueError, match="qkv must be"):
        bk.qk_norm_rope(torch.randn(4, 10), None, torch.ones(1, 2), torch.ones(1, 2), torch.ones(4, 2),
                        torch.ones(4, 2), 2, 1, 1e-6, True)
    with pytest.raises(ValueError, match="routing covers"):
        bk.routed_rms_norm(x, bk.ExpertSegments.uniform(5, False), torch.ones(2, 8), 1e-6)


def test_expert_pack_shares_storage_and_follows_moves():
    from bagel_model.core.layers import MoTDecoderLayer

    from bagel_model.core.config import BagelConfig
    layer = MoTDecoderLayer(BagelConfig.preset("tiny"), 0)
    pack = layer._gate_up.get()
    assert pack.shape == (2, 2, layer.mlp.gate_proj.weight.shape[0], layer.mlp.gate_proj.weight.shape[1])
    # the parameters are views of the pack: no second copy, and writes through either side are seen by both
    assert layer.mlp_moe_gen.up_proj.weight.data_ptr() == pack[1, 1].data_ptr()
    with torch.no_grad():
        layer.mlp_moe_gen.up_proj.weight.fill_(3.0)
    assert torch.all(pack[1, 1] == 3.0)
    layer.to(torch.bfloat16)  # re-allocates the parameters: the pack is rebuilt from them
    again = layer._gate_up.get()
    assert again.dtype == torch.bfloat16 and torch.all(again[1, 1] == 3.0)
    assert layer.mlp_moe_gen.up_proj.weight.data_ptr() == again[1, 1].data_ptr()


def test_layer_forward_triton_matches_reference(tiny_model, monkeypatch):
    """The whole MoT layer stack through the Triton kernels (interpreter) vs the reference kernels."""
    from bagel_model.engine.prefill import TextBlock, prefill
    from bagel_model.oracle import branch_velocity

    m = tiny_model
    x_t = torch.randn(4, m.cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0))
    ctx, _ = prefill(m, [TextBlock([256, 10, 20, 30, 257])])
    outs = {}
    for backend in BACKENDS:
        monkeypatch.setattr(m, "kernels", KernelOptions(backend=backend))
        outs[backend] = branch_velocity(m, x_t, 0.5, (2, 2), ctx, 16)
    assert rel_err(outs["triton"], outs["reference"]) < 1e-5


def test_text_decoding_through_the_triton_kernels_matches_reference(tiny_model, monkeypatch):
    """Greedy decoding with the decode path's kernels (small-batch GEMM, paged attention) under the interpreter
    picks the reference kernels' tokens, and its last hidden state agrees to fp32 rounding."""
    from bagel_model.engine.decode import greedy_decode
    from bagel_model.engine.prefill import TextBlock, prefill

    runs = {}
    for backend in BACKENDS:
        monkeypatch.setattr(tiny_model, "kernels", KernelOptions(backend=backend))
        ctx, h = prefill(tiny_model, [TextBlock(list(range(10, 31)))], extra_capacity=8)
        tokens = greedy_decode(tiny_model, ctx, h, 6, eos_id=-1, use_graph=False)
        _, h_next = prefill(tiny_model, [TextBlock(tokens[-1:])], context=ctx, small_batch=True)
        runs[backend] = (tokens, h_next)
    assert runs["triton"][0] == runs["reference"][0]
    assert rel_err(runs["triton"][1], runs["reference"][1]) < 1e-5
