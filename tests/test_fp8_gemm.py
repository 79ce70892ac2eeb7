"""FP8 routed GEMM (issue #30): the e4m3 quantizers, the plain-torch reference against float64, the Triton kernel
(under the interpreter on CPU, compiled on a GPU) against the reference, and the exactness contract: a row's output
bits never depend on which other rows share the launch.

GPU tests: ``TRITON_INTERPRET=0 python -m pytest tests/test_fp8_gemm.py`` on a GPU with FP8 tensor cores."""
from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":  # the build-report child: import this checkout's package, as pytest's pythonpath does
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402

import bagel_kernels as bk  # noqa: E402
from bagel_kernels import KernelOptions  # noqa: E402
from bagel_kernels import fp8_quant as fq  # noqa: E402
from bagel_kernels.routed_linear_fp8 import routed_gemm_fp8  # noqa: E402
from bagel_kernels.routed_gemm_fp8_triton import fp8_gemm_config, require_fp8_tensor_cores  # noqa: E402

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_GPU = torch.cuda.is_available() and not INTERPRETING
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a GPU with FP8 tensor cores and compiled kernels: "
                                                 "TRITON_INTERPRET=0 pytest ... on the GPU")
interpreter_only = pytest.mark.skipif(not INTERPRETING, reason="the CPU Triton interpreter (TRITON_INTERPRET=1)")


def mixed_routing(m: int) -> bk.ExpertSegments:
    return bk.ExpertSegments.from_flags([(i % 37) >= 11 for i in range(m)])


def bagel_routing(m: int) -> bk.ExpertSegments:
    """The generation step's layout: latents (generation expert) first, 4 marker rows (understanding) last."""
    return bk.ExpertSegments(((0, m - 4, True), (m - 4, m, False)))


# ---------------------------------------------------------------- quantizers

def _roundtrip_bound(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 keeps 3 fraction bits: a normal code is within 2^-4 relative, a subnormal (|x / s| < 2^-6) within half
    the smallest subnormal, 2^-10 * s."""
    return torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-6)


@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
def test_quantize_rows_roundtrip_within_half_an_e4m3_ulp(magnitude):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 300, generator=g) * magnitude * torch.logspace(-3, 0, 64)[:, None]
    q, s = fq.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (64,)
    err = (fq.dequantize_rows(q, s) - x).abs()
    assert (err <= _roundtrip_bound(x, s[:, None])).all()
    assert (q.float().abs().amax(1) == fq.FP8_MAX).all(), "each row's amax must land on +-448"


def test_quantize_rows_is_per_row_and_accepts_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 128, generator=g).bfloat16()
    q, s = fq.quantize_rows(x)
    for i in (0, 7, 39):
        qi, si = fq.quantize_rows(x[i:i + 1])
        assert torch.equal(qi.view(torch.uint8), q[i:i + 1].view(torch.uint8)) and torch.equal(si, s[i:i + 1])


def test_zero_rows_get_scale_one_and_exact_zeros():
    x = torch.randn(4, 64)
    x[2] = 0
    q, s = fq.quantize_rows(x)
    assert s[2].item() == 1.0
    assert (q[2].float() == 0).all() and (fq.dequantize_rows(q, s)[2] == 0).all()
    qg, sg = fq.quantize_row_groups(torch.zeros(2, 256))
    assert (sg == 1).all() and (qg.float() == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_dequantize_to_nan_and_leave_other_rows_alone(bad):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, generator=g)
    x[1, 5] = bad
    q, s = fq.quantize_rows(x)
    assert not torch.isfinite(s[1])
    assert torch.isnan(fq.dequantize_rows(q, s)[1]).all(), "a non-finite row must not become numbers"
    q0, s0 = fq.quantize_rows(x[[0, 2]])
    assert torch.equal(q0.view(torch.uint8), q[[0, 2]].view(torch.uint8)) and torch.equal(s0, s[[0, 2]])


def test_cast_saturates_and_rounds_to_nearest_even():
    q = fq._cast(torch.tensor([448.0, 449.0, 480.0, 1e6, -1e30, float("inf"), -float("inf")])).float()
    assert q.tolist() == [448.0, 448.0, 448.0, 448.0, -448.0, 448.0, -448.0]
    assert torch.isnan(fq._cast(torch.tensor([float("nan")])).float()).all()
    # ties to even: 1.0625 is halfway between 1.0 and 1.125, 1.1875 between 1.125 and 1.25; 2^-10 between 0 and 2^-9
    assert fq._cast(torch.tensor([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10])).float().tolist() == \
        [1.0, 1.25, 0.0, 2.0 ** -8]


@pytest.mark.parametrize("k", [256, 200])
def test_row_groups_roundtrip_and_ragged_last_group(k):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, k, generator=g) * torch.logspace(-4, 2, k)[None, :]  # groups of very different magnitude
    x[:, :128] *= 1e-3
    q, s = fq.quantize_row_groups(x)
    assert q.shape == (8, k) and s.shape == (8, -(-k // 128))
    bound = _roundtrip_bound(x, s.repeat_interleave(128, 1)[:, :k])
    assert ((fq.dequantize_row_groups(q, s) - x).abs() <= bound).all()
    # finer than per row: the small-magnitude group keeps its precision
    qr, sr = fq.quantize_rows(x)
    group_err = (fq.dequantize_row_groups(q, s) - x)[:, :128].abs().max()
    assert group_err * 10 < (fq.dequantize_rows(qr, sr) - x)[:, :128].abs().max()


def test_channels_on_a_stacked_routed_weight():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(2, 2, 48, 96, generator=g) * torch.logspace(-2, 1, 48)[:, None]
    q, s = fq.quantize_channels(w)
    assert q.shape == w.shape and s.shape == (2, 2, 48)
    assert ((fq.dequantize_channels(q, s) - w).abs() <= _roundtrip_bound(w, s[..., None])).all()


@pytest.mark.parametrize("n,k", [(256, 384), (200, 300)])
def test_blocks_roundtrip(n, k):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(2, n, k, generator=g)
    w[:, :128, :128] *= 1e-3
    q, s = fq.quantize_blocks(w)
    assert q.shape == w.shape and s.shape == (2, -(-n // 128), -(-k // 128))
    sfull = s.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :n, :k]
    assert ((fq.dequantize_blocks(q, s) - w).abs() <= _roundtrip_bound(w, sfull)).all()
    assert s[0, 0, 0] < s[0, 0, 1] / 100, "the small block has its own scale"


def test_quantizers_reject_fp8_and_integer_input():
    with pytest.raises(TypeError, match="floating-point"):
        fq.quantize_rows(torch.zeros(2, 4, dtype=torch.float8_e4m3fn))
    with pytest.raises(TypeError, match="floating-point"):
        fq.quantize_channels(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="rows, K"):
        fq.quantize_rows(torch.zeros(2, 3, 4))


# ---------------------------------------------------------------- reference GEMM

def make_case(m: int, n: int, k: int, swiglu: bool, bias: bool, residual: bool, seed: int = 0,
              device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    p = 2 if swiglu else 1
    x = torch.randn(m, k, generator=g).bfloat16()
    w = torch.randn(2, p, n, k, generator=g) * (0.5 / k ** 0.5) * torch.logspace(-1, 1, n)[:, None]
    b = (torch.randn(2, p, n, generator=g) * 0.1).bfloat16() if bias else None
    res = torch.randn(m, n, generator=g).bfloat16() if residual else None
    xq, xs = fq.quantize_rows(x)
    wq, ws = fq.quantize_channels(w)
    mv = (lambda t: None if t is None else t.to(device))
    return mv(xq), mv(xs), mv(wq), mv(ws), mv(b), mv(res)


def float64_truth(xq, xs, routing, wq, ws, b, swiglu, res):
    """Per-row float64 of the dequantized operands (no intermediate rounding)."""
    ids = routing.expert_ids("cpu").long()
    xd = fq.dequantize_rows(xq.cpu(), xs.cpu()).double()
    wd = fq.dequantize_channels(wq.cpu(), ws.cpu()).double()
    out = []
    for p in range(wq.shape[1]):
        y = xd.new_zeros(xd.shape[0], wq.shape[2])
        for e in range(wq.shape[0]):  # one float64 GEMM per expert over its rows
            rows = ids == e
            y[rows] = xd[rows] @ wd[e, p].T + (0 if b is None else b.cpu().double()[e, p])
        out.append(y)
    y = torch.nn.functional.silu(out[0]) * out[1] if swiglu else out[0]
    return y if res is None else y + res.cpu().double()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert not torch.isnan(got).any(), "NaN in output"
    return ((got.cpu().double() - want).norm() / want.norm().clamp_min(1e-30)).item()


EPILOGUES = [(False, True, False), (True, False, False), (False, False, True), (True, True, True)]


@pytest.mark.parametrize("swiglu,bias,residual", EPILOGUES)
@pytest.mark.parametrize("routing", ["mixed", "bagel"])
def test_reference_matches_float64(swiglu, bias, residual, routing):
    m, n, k = 150, 96, 256
    xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, bias, residual)
    r = mixed_routing(m) if routing == "mixed" else bagel_routing(m)
    got = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation="swiglu" if swiglu else None, residual=res)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    # bf16 output rounding (2^-9) and, for SwiGLU, the rounded gate/up/silu: a few 2^-9
    assert rel_err(got, float64_truth(xq, xs, r, wq, ws, b, swiglu, res)) < 1e-2


def _assert_rows_invariant(options: KernelOptions, m: int, n: int, k: int, swiglu: bool, device: str = "cpu",
                           cuts=((0, 1), (5, 6), (3, 150), (130, 300), (11, 37), (299, 300))):
    xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, True, not swiglu, seed=7, device=device)
    act = "swiglu" if swiglu else None
    for r in (mixed_routing(m), bagel_routing(m)):
        full = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res, options=options)
        for a, z in cuts:
            part = routed_gemm_fp8(xq[a:z], xs[a:z], r.slice(a, z), wq, ws, b, activation=act,
                                   residual=None if res is None else res[a:z], options=options)
            assert torch.equal(part, full[a:z]), f"rows [{a}, {z}) differ from the full launch of {m} rows"


@pytest.mark.parametrize("swiglu", [False, True])
def test_reference_rows_are_batch_invariant(swiglu):
    _assert_rows_invariant(KernelOptions(backend="reference"), 300, 96, 128, swiglu)


def test_nan_row_stays_nan_and_does_not_touch_other_rows():
    m, n, k = 40, 64, 128
    x = torch.randn(m, k).bfloat16()
    x[9, 3] = float("nan")
    xq, xs = fq.quantize_rows(x)
    wq, ws = fq.quantize_channels(torch.randn(2, 1, n, k) * 0.1)
    out = routed_gemm_fp8(xq, xs, mixed_routing(m), wq, ws)
    assert torch.isnan(out[9]).all() and not torch.isnan(out[torch.arange(m) != 9]).any()


def test_bad_inputs_are_named():
    xq, xs, wq, ws, _, _ = make_case(16, 32, 64, False, False, False)
    r = mixed_routing(16)
    with pytest.raises(TypeError, match="e4m3fn codes"):
        routed_gemm_fp8(xq.float(), xs, r, wq, ws)
    with pytest.raises(ValueError, match="x_scale"):
        routed_gemm_fp8(xq, xs[:3], r, wq, ws)
    with pytest.raises(ValueError, match="w_scale"):
        routed_gemm_fp8(xq, xs, r, wq, ws.double())
    with pytest.raises(ValueError, match="weight parts"):
        routed_gemm_fp8(xq, xs, r, wq, ws, activation="swiglu")
    with pytest.raises(ValueError, match="needs a routing"):
        routed_gemm_fp8(xq, xs, None, wq, ws)


def test_config_depends_on_weight_shape_only():
    assert fp8_gemm_config(4608, 3584, False) == fp8_gemm_config(4608, 3584, False)
    cfg = fp8_gemm_config(18944, 3584, True)
    assert (cfg.BLOCK_M, cfg.BLOCK_K) == (128, 128)


def test_gpu_without_fp8_tensor_cores_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"A100.*8\.0.*FP8 tensor cores"):
        require_fp8_tensor_cores(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    require_fp8_tensor_cores(torch.device("cuda", 0))  # Ada: fine


# ---------------------------------------------------------------- Triton kernel under the CPU interpreter

@interpreter_only
@pytest.mark.parametrize("swiglu,bias,residual", EPILOGUES)
def test_triton_interpreter_matches_reference(swiglu, bias, residual):
    m, n, k = 150, 96, 256
    xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, bias, residual, seed=11)
    r = mixed_routing(m)
    act = "swiglu" if swiglu else None
    tri = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res, options=KernelOptions(backend="triton"))
    ref = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res)
    truth = float64_truth(xq, xs, r, wq, ws, b, swiglu, res)
    assert rel_err(tri, truth) < 1e-2
    # the same codes and epilogue: at most a few bf16 ulps apart (fp32 summation order only)
    assert (tri.float() - ref.float()).abs().max() <= 4 * 2.0 ** -8 * ref.float().abs().max()


@interpreter_only
@pytest.mark.parametrize("swiglu", [False, True])
def test_triton_interpreter_rows_are_batch_invariant(swiglu):
    _assert_rows_invariant(KernelOptions(backend="triton"), 300, 80, 128, swiglu,
                           cuts=((0, 1), (3, 150), (130, 300), (299, 300)))


# ---------------------------------------------------------------- compiled kernel on the GPU

@gpu_only
@pytest.mark.parametrize("swiglu,bias,residual", EPILOGUES)
@pytest.mark.parametrize("k", [512, 3584])
def test_gpu_kernel_matches_reference(swiglu, bias, residual, k):
    m, n = 1000, 640
    xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, bias, residual, seed=13, device="cuda")
    r = mixed_routing(m)
    act = "swiglu" if swiglu else None
    tri = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res)
    ref = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res, options=KernelOptions(backend="reference"))
    truth = float64_truth(xq, xs, r, wq, ws, b, swiglu, res)
    assert rel_err(tri, truth) < 1e-2
    assert rel_err(tri, ref.cpu().double()) < 1e-2


@gpu_only
@pytest.mark.parametrize("swiglu", [False, True])
def test_gpu_rows_are_batch_invariant_across_m(swiglu):
    _assert_rows_invariant(KernelOptions(), 1200, 640, 512, swiglu, device="cuda",
                           cuts=((0, 1), (5, 6), (3, 150), (130, 1200), (11, 37), (1196, 1200), (0, 1199),
                                 (700, 1000)))


@gpu_only
def test_gpu_nan_row_stays_nan():
    m, n, k = 300, 256, 256
    x = torch.randn(m, k, device="cuda").bfloat16()
    x[77, 0] = float("nan")
    xq, xs = fq.quantize_rows(x)
    wq, ws = fq.quantize_channels(torch.randn(2, 1, n, k, device="cuda") * 0.1)
    out = routed_gemm_fp8(xq, xs, mixed_routing(m), wq, ws)
    assert torch.isnan(out[77]).all() and not torch.isnan(out[torch.arange(m, device="cuda") != 77]).any()


@gpu_only
@pytest.mark.parametrize("swiglu,bias,residual", EPILOGUES)
def test_gpu_gluon_and_triton_kernels_agree_and_split_keeps_bits(swiglu, bias, residual):
    """Hopper runs the Gluon kernel; the Triton kernel is the fallback. With promotion (the shipped config) both sum
    each 128-wide K step in the MMA and add the steps in fp32 in K order, so their bits are equal although their
    tiles differ (measured equal at all BAGEL shapes, H100, 2026-12-07); without promotion the Gluon kernel is within
    1 % of them. The Gluon kernel's rows do not depend on the stream-K split or on how the routing is given."""
    from bagel_kernels.routed_gemm_fp8_gluon import fp8_gluon_config, routed_gemm_fp8_gluon
    from bagel_kernels.routed_gemm_fp8_triton import routed_gemm_fp8_triton

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon FP8 kernel runs on Hopper")
    m, n, k = 3000, 640, 3584
    xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, bias, residual, seed=5, device="cuda")
    segs = ((0, 2996, 1), (2996, 3000, 0))
    ids = bk.ExpertSegments(tuple((s0, s1, bool(e)) for s0, s1, e in segs)).expert_ids("cuda")
    tri = routed_gemm_fp8_triton(xq, xs, wq, ws, b, ids, swiglu, res)
    for promote in (True, False):
        cfg = fp8_gluon_config(n, k, swiglu, promote)
        outs = [routed_gemm_fp8_gluon(xq, xs, wq, ws, b, ids, swiglu, res, segments=segs, split_tail=split, config=cfg)
                for split in (False, True)]
        assert torch.equal(outs[0], outs[1])
        if promote:
            assert torch.equal(outs[0], tri)
        else:  # measured 2.0-4.2e-3 at BAGEL's shapes
            assert rel_err(outs[0], tri.double().cpu()) < 1e-2
        ids_only = routed_gemm_fp8_gluon(xq, xs, wq, ws, b, ids, swiglu, res, config=cfg)  # no segments: row ids
        assert torch.equal(ids_only, outs[0])


@gpu_only
def test_gpu_quantizers_match_torch_quantize_rows():
    """The standalone quantizer and the quantizing RMSNorm give ``quantize_rows``'s codes and scales on the GPU, and
    those are the CPU reference's (the scale's division is correctly rounded on both devices)."""
    from bagel_kernels.fp8_quant_triton import quantize_rows_triton
    from bagel_kernels.norms_triton import rms_norm_fp8_triton, rms_norm_triton

    _check_quantizers(quantize_rows_triton, rms_norm_fp8_triton, rms_norm_triton, "cuda")
    x = torch.randn(4096, 512, generator=torch.Generator().manual_seed(1)) * 7
    cpu, gpu = fq.quantize_rows(x), fq.quantize_rows(x.cuda())
    assert torch.equal(gpu[1].cpu(), cpu[1]) and torch.equal(gpu[0].cpu().view(torch.uint8), cpu[0].view(torch.uint8))


def test_scales_are_the_correctly_rounded_quotient():
    """scale = amax / 448 rounded once (checked against float64): not amax * (1/448), which torch computes on CUDA
    for a Python-float divisor and which is one ulp off for about half the values."""
    amax = torch.rand(100000, generator=torch.Generator().manual_seed(2)) * 1000 + 1e-3
    devices = ["cpu"] + (["cuda"] if ON_GPU else [])
    for dev in devices:
        got = fq._scale_from_amax(amax.to(dev)).cpu()
        assert torch.equal(got, (amax.double() / 448).float()), dev


# ---------------------------------------------------------------- the Triton quantizers (interpreter and GPU)

def _same_codes(q: torch.Tensor, s: torch.Tensor, rq: torch.Tensor, rs: torch.Tensor) -> None:
    """Equal scales and codes, NaN where the reference has NaN (a NaN code's sign bit is not part of the contract)."""
    nan = torch.isnan(rq.float())
    assert torch.equal(torch.isnan(q.float()), nan)
    assert torch.equal(q.view(torch.uint8)[~nan], rq.view(torch.uint8)[~nan])
    assert torch.equal(torch.isnan(s), torch.isnan(rs)) and torch.equal(s.nan_to_num(), rs.nan_to_num())


def _check_quantizers(quantize, rms_fp8, rms, device: str) -> None:
    g = torch.Generator().manual_seed(3)
    mags = torch.tensor([1e-6, 1.0, 3e4, 1.0, 1.0, 1.0, 1.0, 0.5])
    x = (torch.randn(8, 3000, generator=g) * mags[:, None]).bfloat16()
    x[3] = 0
    x[4, 5] = float("nan")
    x[5, 7] = float("inf")
    x[6, :8] = torch.tensor([448.0, -448.0, 1.0625, 1.1875, 2.0 ** -10, -2.0 ** -10, 0.0, -0.0])
    x = x.to(device)
    _same_codes(*quantize(x), *fq.quantize_rows(x))
    w = (1 + 0.1 * torch.randn(2, 3000, generator=g)).bfloat16().to(device)
    ids = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0], dtype=torch.int32, device=device)
    y = torch.randn(8, 3000, generator=g).bfloat16().to(device) * 3
    _same_codes(*rms_fp8(y, w, 1e-6, ids), *fq.quantize_rows(rms(y, w, 1e-6, ids)))
    # the static bound ("qkv_bound"): the expert's norm_bound_scale, NaN scale for a row with a NaN or an inf, and
    # a one-spike row (the bound's extreme: |x_i| / rms = sqrt(K)) within 448
    y[2, 9], y[5, 3], y[6], y[7] = float("nan"), float("inf"), 0.0, 0.0
    y[6, 11] = 5.0
    want = fq.quantize_rows_static(rms(y, w, 1e-6, ids), fq.norm_bound_scale(w)[ids.long()])
    q, s = rms_fp8(y, w, 1e-6, ids, static=True)
    _same_codes(q, s, *want)
    assert torch.isnan(s[[2, 5]]).all() and torch.isfinite(s[[0, 1, 3, 4, 6, 7]]).all()
    assert float(q[6].float().abs().max()) <= 448 and float(q[6].float().abs().max()) > 256


@interpreter_only
def test_interpreter_quantizers_match_quantize_rows():
    """Under the interpreter (whose own fp32 -> e4m3 cast does not round to nearest) the kernels round on the grid
    by hand and write NaN codes as bits: the same codes as the reference."""
    from bagel_kernels.fp8_quant_triton import quantize_rows_triton
    from bagel_kernels.norms_triton import rms_norm_fp8_triton, rms_norm_triton

    _check_quantizers(quantize_rows_triton, rms_norm_fp8_triton, rms_norm_triton, "cpu")


def _check_quantizer_pieces(device: str) -> None:
    from bagel_kernels.fp8_quant_triton import quantize_rows_triton

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(5, 3000, generator=g) * 5).bfloat16()
    x[1, 2900] = float("nan")  # in the last piece of 256 and of 1024
    x[2, 1500] = float("inf")
    x[3] = 0
    x[4, 2999] = 1e4  # the amax in the ragged last piece
    x = x.to(device)
    want = fq.quantize_rows(x)
    for chunk in (256, 1024, 4096):
        _same_codes(*quantize_rows_triton(x, chunk=chunk), *want)
    _same_codes(*quantize_rows_triton(x, resident=True), *want)  # 2048 + 1024 lanes: the NaN, the amax in the tail
    _same_codes(*quantize_rows_triton(x[:, :2048], resident=True), *fq.quantize_rows(x[:, :2048]))  # no tail
    with pytest.raises(ValueError, match="power of two"):
        quantize_rows_triton(x, chunk=1000)


@interpreter_only
def test_interpreter_quantizer_pieces_give_the_reference_codes():
    """The standalone quantizer walks a row in pieces (an amax pass, then an encode pass): every piece width gives
    the reference's codes and scales, with the NaN, the inf or the amax in a later piece; so does the variant that
    holds the row in registers as a power-of-two block and a tail (``resident=True``)."""
    _check_quantizer_pieces("cpu")


@gpu_only
def test_gpu_quantizer_pieces_give_the_reference_codes():
    _check_quantizer_pieces("cuda")


def test_norm_bound_scale_is_sqrt_k_times_max_weight_over_448():
    w = torch.randn(2, 3000, generator=torch.Generator().manual_seed(4)).bfloat16()
    w[1, 17] = -9.0
    got = fq.norm_bound_scale(w)
    root = torch.sqrt(torch.tensor(3000.0))
    want = torch.stack([root * w[0].float().abs().max(), root * torch.tensor(9.0)]) / torch.tensor(448.0)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert float(fq.norm_bound_scale(torch.zeros(1, 8))[0]) == 1.0
    assert torch.isnan(fq.norm_bound_scale(torch.tensor([[1.0, float("nan")]])))[0]
    with pytest.raises(ValueError, match="dimensions"):
        fq.norm_bound_scale(torch.ones(8))
    with pytest.raises(ValueError, match="experts, K"):
        fq.norm_bound_scale(torch.ones(2, 3, 8))


def test_no_normalized_row_passes_the_static_bound():
    """The RMSNorm output bound holds for any input: Gaussian, constant, heavy-tailed and one-spike rows all
    quantize inside +-448 under the static scale, and a typical row keeps its precision (e4m3 is floating point:
    a coarser scale moves values down the exponent range, it loses bits only among the subnormals)."""
    g = torch.Generator().manual_seed(5)
    k = 3584
    w = (1 + 0.3 * torch.randn(2, k, generator=g)).bfloat16()
    x = torch.randn(6, k, generator=g)
    x[1] = 1.0
    x[2] = torch.randn(k, generator=g) ** 5
    x[3] = 0.0
    x[3, 100] = -1e4
    x[4] = 0.0
    x[4, w[0].float().abs().argmax()] = 3.0  # the spike where the weight is largest: |h| at the bound itself
    x[5] *= 1e-2  # small, as far as eps (1e-6) allows: the output stays O(1)
    r = bk.ExpertSegments(((0, 6, False),))
    h = bk.routed_rms_norm(x.bfloat16(), r, w, 1e-6).float()
    bound = fq.norm_bound_scale(w)[0]
    assert float((h.abs() / bound).max()) <= 448 * (1 + 2 ** -7)  # the bf16 roundings of the normalized value
    assert float((h[4].abs() / bound).max()) > 440
    q, s = fq.quantize_rows_static(h, bound.expand(6))
    deq = q.float() * s[:, None]
    for row in (0, 2, 5):
        assert float((deq[row] - h[row]).norm() / h[row].norm()) < 0.04, row


def test_quantizing_rms_norm_static_reference():
    r = bk.ExpertSegments(((0, 5, False), (5, 9, True)))
    x = torch.randn(9, 64).bfloat16()
    w = torch.randn(2, 64).bfloat16()
    got = bk.routed_rms_norm_fp8(x, r, w, 1e-6, static_bound=True)
    bound = fq.norm_bound_scale(w)
    assert torch.equal(got.scale, torch.cat([bound[0].expand(5), bound[1].expand(4)]))
    want = fq.quantize_rows_static(bk.routed_rms_norm(x, r, w, 1e-6), got.scale)
    assert torch.equal(got.codes.view(torch.uint8), want[0].view(torch.uint8))


def test_quantizing_rms_norm_reference_is_quantize_rows_of_the_norm():
    r = bk.ExpertSegments(((0, 5, False), (5, 9, True)))
    x = torch.randn(9, 64).bfloat16()
    w = torch.randn(2, 64).bfloat16()
    got = bk.routed_rms_norm_fp8(x, r, w, 1e-6)
    want = fq.quantize_rows(bk.routed_rms_norm(x, r, w, 1e-6))
    assert got.dtype == torch.bfloat16 and torch.equal(got.scale, want[1])
    assert torch.equal(got.codes.view(torch.uint8), want[0].view(torch.uint8))


# ---------------------------------------------------------------- sm_90a build on any machine (no GPU needed)

# The shipped configs at BAGEL's projections: (N, K, swiglu, bias, residual)
BUILD_VARIANTS = [(4608, 3584, False, True, False), (3584, 3584, False, False, True), (18944, 3584, True, False, False),
                  (3584, 18944, False, False, True)]


def _build_for_hopper(n: int, k: int, swiglu: bool, bias: bool, residual: bool) -> dict:
    """Compile the FP8 kernel as the launcher would for these weights (Triton builds the cubin on the CPU)."""
    import re

    from triton.tools.tensor_descriptor import TensorDescriptor

    from bagel_kernels.routed_gemm_fp8_triton import _routed_gemm_fp8
    from hopper_build import compile_for_hopper

    cfg, m, p = fp8_gemm_config(n, k, swiglu), 256, 2 if swiglu else 1
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    wq = torch.empty(2 * p, n, k, dtype=torch.float8_e4m3fn)
    out = torch.empty(m, n, dtype=torch.bfloat16)
    args = dict(x_desc=TensorDescriptor.from_tensor(xq, [cfg.BLOCK_M, cfg.BLOCK_K]),
                w_desc=TensorDescriptor.from_tensor(wq, [1, cfg.BLOCK_N, cfg.BLOCK_K]),
                out_desc=TensorDescriptor.from_tensor(out, [cfg.BLOCK_M, cfg.BLOCK_N]),
                res_desc=TensorDescriptor.from_tensor(out, [cfg.BLOCK_M, cfg.BLOCK_N]),
                XS=torch.empty(m), WS=torch.empty(2 * p, n), BIAS=torch.empty(2 * p, n, dtype=torch.bfloat16),
                IDS=torch.empty(m, dtype=torch.int32), COUNTER=torch.empty(1, dtype=torch.int32), M=m, N=n, K=k)
    consts = dict(HAS_IDS=True, HAS_BIAS=bias, HAS_RES=residual, SWIGLU=swiglu, BLOCK_M=cfg.BLOCK_M,
                  BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M, PRECISE=cfg.precise_acc,
                  INTERPRETER=False, BF16_BITS=False)
    c = compile_for_hopper(_routed_gemm_fp8, args, consts, cfg.num_warps, num_stages=cfg.num_stages, gluon=False)
    ptx = c.asm["ptx"]
    return {"variant": [n, k, swiglu, bias, residual], "shared": c.metadata.shared,
            "fp8_wgmma": bool(re.search(r"wgmma\.mma_async\S*\.f32\.e4m3\.e4m3", ptx)),
            "tma": "cp.async.bulk.tensor" in ptx, "fp32_adds": len(re.findall(r"\badd\.f32", ptx))}


def test_fp8_kernel_builds_for_hopper():
    """Every shipped variant of both FP8 kernels (Triton, promoted; warp-specialized Gluon, fast and promoted)
    compiles to sm_90a FP8 wgmma with TMA operands and fits shared memory; the promoted ones promote the MMA
    accumulator with fp32 adds (one per accumulator element and K step: many more than the epilogue's). In a fresh
    process without the interpreter (see hopper_build)."""
    from hopper_build import report_from_child

    report = report_from_child(__file__)
    assert len(report) == 3 * len(BUILD_VARIANTS)  # the Triton kernel's, then the Gluon kernel's fast and promoted
    for r in report:
        assert r["fp8_wgmma"] and r["tma"], r
        assert r.get("setmaxnreg", True), r  # the Gluon kernel is warp-specialized
        assert r["shared"] <= 227 * 1024, r
    fast, promoted = report[len(BUILD_VARIANTS):2 * len(BUILD_VARIANTS)], report[2 * len(BUILD_VARIANTS):]
    for r in report[:len(BUILD_VARIANTS)] + promoted:
        assert r["fp32_adds"] >= 32, r
    for f, p in zip(fast, promoted):
        assert f["fp32_adds"] < p["fp32_adds"], (f, p)


def _build_gluon_for_hopper(n: int, k: int, swiglu: bool, bias: bool, residual: bool, promote: bool) -> dict:
    """Compile the Gluon FP8 kernel (``fp8_gluon_config`` with or without promotion) as the launcher would."""
    import re

    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    import bagel_kernels.routed_gemm_gluon as rg
    from bagel_kernels.routed_gemm_fp8_gluon import fp8_gluon_config
    from hopper_build import compile_for_hopper

    cfg, m, p = fp8_gluon_config(n, k, swiglu, promote), 300, 2 if swiglu else 1
    BLOCK_K = cfg.block_k
    xq = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    wq = torch.empty(2 * p * n, k, dtype=torch.float8_e4m3fn)
    out = torch.empty(m, n, dtype=torch.bfloat16)

    def desc(t, block, dt):
        return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dt))

    od = desc(out, [rg.BLOCK_M, cfg.block_n], gl.bfloat16)
    args = dict(x_desc=desc(xq, [rg.BLOCK_M, BLOCK_K], gl.float8e4nv), w_desc=desc(wq, [cfg.block_n, BLOCK_K],
                gl.float8e4nv), out_desc=od, res_desc=od, OUT=out, RES=out, BIAS=out,
                IDS=torch.empty(m, dtype=torch.int32), WS=torch.empty(1), FLAGS=torch.empty(1, dtype=torch.int32),
                XS=torch.empty(m), WSC=torch.empty(2 * p * n), M=m, N=n, K=k, ldo=n, ldr=n, b1=296, b2=300, b3=300,
                e0=1, split_tail=1)
    consts = dict(SEGMENTED=True, HAS_IDS=False, HAS_BIAS=bias, HAS_RES=residual, P=p, GROUP_M=rg.GROUP_M,
                  STAGES=cfg.stages, num_warps=rg.NUM_WARPS, SCALED=True, PROMOTE=cfg.promote)
    c = compile_for_hopper(rg._routed_gemm_ws, args, consts, rg.NUM_WARPS, rg.MAXNREG)
    ptx = c.asm["ptx"]
    return {"variant": ["gluon", n, k, swiglu, bias, residual, promote], "shared": c.metadata.shared,
            "fp8_wgmma": bool(re.search(r"wgmma\.mma_async\S*\.f32\.e4m3\.e4m3", ptx)),
            "tma": "cp.async.bulk.tensor" in ptx, "fp32_adds": len(re.findall(r"\badd\.f32", ptx)),
            "setmaxnreg": "setmaxnreg" in ptx}


# ---------------------------------------------------------------- the small-batch kernel (AR decode)

def _check_small_batch(device: str, opts: KernelOptions) -> None:
    """Decode's kernel: the float64 truth to the bf16 epilogue's rounding, every epilogue, one expert or mixed
    rows; a row's bits the same in a launch of 1, 5 or 16 rows; more than 16 rows refused."""
    from bagel_kernels.routed_gemm_fp8_small_batch import routed_gemm_fp8_small_batch

    m, n, k = 16, 80, 192  # N and K not multiples of the tiles: the masks
    for swiglu, bias, residual in EPILOGUES:
        act = "swiglu" if swiglu else None
        xq, xs, wq, ws, b, res = make_case(m, n, k, swiglu, bias, residual, seed=3, device=device)
        for r in (mixed_routing(m), bk.ExpertSegments.uniform(m, False)):
            full = routed_gemm_fp8(xq, xs, r, wq, ws, b, activation=act, residual=res, options=opts,
                                   small_batch=True)
            assert rel_err(full, float64_truth(xq, xs, r, wq, ws, b, swiglu, res)) < 1e-2
            for a, z in ((0, 1), (3, 8), (15, 16)):
                part = routed_gemm_fp8(xq[a:z], xs[a:z], r.slice(a, z), wq, ws, b, activation=act,
                                       residual=None if res is None else res[a:z], options=opts, small_batch=True)
                assert torch.equal(part, full[a:z]), (swiglu, bias, residual, a, z)
    xq, xs, wq, ws, _, _ = make_case(17, n, k, False, False, False, device=device)
    with pytest.raises(ValueError, match="at most 16 rows"):
        routed_gemm_fp8_small_batch(xq, xs, wq, ws, None, None)


@interpreter_only
def test_interpreter_small_batch_kernel_matches_truth_and_is_batch_invariant():
    _check_small_batch("cpu", KernelOptions(backend="triton"))


@gpu_only
def test_gpu_small_batch_kernel_matches_truth_and_is_batch_invariant():
    _check_small_batch("cuda", KernelOptions())


def test_small_batch_flag_leaves_the_reference_and_large_launches_alone():
    """On the reference backend (the CPU path) and for more than 16 rows, ``small_batch`` changes no bit."""
    xq, xs, wq, ws, b, res = make_case(40, 64, 128, False, True, True, seed=4)
    r = mixed_routing(40)
    want = routed_gemm_fp8(xq, xs, r, wq, ws, b, residual=res)
    assert torch.equal(routed_gemm_fp8(xq, xs, r, wq, ws, b, residual=res, small_batch=True), want)
    assert torch.equal(routed_gemm_fp8(xq[:3], xs[:3], r.slice(0, 3), wq, ws, b, residual=res[:3],
                                       small_batch=True), want[:3])


def test_small_batch_kernel_builds_for_hopper():
    """The decode kernel compiles for sm_90a at BAGEL's four projections (Triton builds the cubin on the CPU)."""
    import subprocess

    r = subprocess.run([sys.executable, __file__, "small-batch-build"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=str(Path(__file__).parent))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("built") == len(BUILD_VARIANTS), r.stdout


def _small_batch_build_report() -> None:
    from bagel_kernels.routed_gemm_fp8_small_batch import fp8_small_batch_tiles
    from bagel_kernels.routed_gemm_triton import _routed_gemm_small_batch
    from hopper_build import compile_for_hopper

    for n, k, swiglu, bias, residual in BUILD_VARIANTS:
        p, m = 2 if swiglu else 1, 16
        bn, bkk = fp8_small_batch_tiles(n, k)
        xq, out = torch.empty(m, k, dtype=torch.float8_e4m3fn), torch.empty(m, n, dtype=torch.bfloat16)
        args = dict(X=xq, W=torch.empty(2, p, n, k, dtype=torch.float8_e4m3fn), XS=torch.empty(m),
                    WS=torch.empty(2, p, n), OUT=out, RES=out, BIAS=torch.empty(2, p, n, dtype=torch.bfloat16),
                    IDS=torch.empty(m, dtype=torch.int32), M=m, N=n, K=k, s_xm=k, s_om=n, s_rm=n)
        consts = dict(HAS_IDS=True, HAS_BIAS=bias, HAS_RES=residual, SWIGLU=swiglu, BLOCK_M=16, BLOCK_N=bn,
                      BLOCK_K=bkk, DOT_PREC="tf32", INTERPRETER=False, SCALED=True, BF16_BITS=False)
        c = compile_for_hopper(_routed_gemm_small_batch, args, consts, 4, num_stages=4, gluon=False)
        ptx = c.asm["ptx"]
        assert ".target sm_90a" in ptx and ("mma.sync" in ptx or "wgmma" in ptx), (n, k)
        print(f"built N={n} K={k} swiglu={swiglu}: shared {c.metadata.shared} B, "
              f"{'wgmma' if 'wgmma' in ptx else 'mma.sync'}", flush=True)

def test_quantizers_build_for_hopper():
    """The standalone quantizer (both row widths) and the quantizing RMSNorm (per row and static) compile for sm_90a
    (Triton builds the cubin on the CPU) with the correctly rounded division and the hardware's e4m3 conversion."""
    import subprocess

    r = subprocess.run([sys.executable, __file__, "quantizer-build"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TRITON_INTERPRET": "0"}, cwd=str(Path(__file__).parent))
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("built")]
    assert len(lines) == 4, r.stdout
    for ln in lines:
        assert "div.rn" in ln and "e4m3 cvt" in ln, ln


def _quantizer_build_report() -> None:
    from bagel_kernels.fp8_quant_triton import _quantize_rows, quantizer_chunk
    from bagel_kernels.norms_triton import _rms_norm
    from hopper_build import compile_for_hopper

    for k in (3584, 18944):
        chunk = quantizer_chunk(k)
        args = dict(X=torch.empty(8, k, dtype=torch.bfloat16), Q=torch.empty(8, k, dtype=torch.float8_e4m3fn),
                    S=torch.empty(8), s_x=k, K=k)
        c = compile_for_hopper(_quantize_rows, args, dict(CHUNK=chunk, INTERPRETER=False),
                               8 if chunk >= 2048 else 4, gluon=False)
        _print_quantizer_build(f"quantizer K={k}", c.asm["ptx"])
    for static in (False, True):
        x = torch.empty(8, 3584, dtype=torch.bfloat16)
        args = dict(X=x, W=torch.empty(2, 3584, dtype=torch.bfloat16), IDS=torch.empty(8, dtype=torch.int32),
                    OUT=x, Q=torch.empty(8, 3584, dtype=torch.float8_e4m3fn), QS=torch.empty(8), s_x=3584, s_o=0,
                    H=3584, eps=1e-6)
        consts = dict(HAS_IDS=True, BLOCK_H=4096, QUANT=True, STATIC=static, INTERPRETER=False)
        c = compile_for_hopper(_rms_norm, args, consts, 8, gluon=False)
        _print_quantizer_build(f"rms_norm_fp8 static={static}", c.asm["ptx"])


def _print_quantizer_build(what: str, ptx: str) -> None:
    assert ".target sm_90a" in ptx, what
    facts = [f for f, ok in (("div.rn", "div.rn.f32" in ptx), ("e4m3 cvt", "e4m3x2.f32" in ptx)) if ok]
    print(f"built {what}: {' '.join(facts)}", flush=True)


if __name__ == "__main__":  # the build reports of test_fp8_kernel_builds_for_hopper and the other build tests
    if sys.argv[1:] == ["small-batch-build"]:
        _small_batch_build_report()
    elif sys.argv[1:] == ["quantizer-build"]:
        _quantizer_build_report()
    else:
        import json

        print(json.dumps([_build_for_hopper(*v) for v in BUILD_VARIANTS]
                         + [_build_gluon_for_hopper(*v, promote) for promote in (False, True) for v in BUILD_VARIANTS]))
