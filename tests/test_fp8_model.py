"""The FP8 model (issue #30, model side): ``KernelOptions(quantization="fp8")`` quantizes every MoT projection of
both experts to float8_e4m3fn with per-output-channel scales, runs them through ``routed_linear_fp8`` (per-row
activation quantization + ``routed_gemm_fp8``), saves and loads the codes bit for bit, and is its own exactness
class: other bits than the float model (within a stated error), but batch-invariant and parallel-exact.

On the CPU (tiny preset, float32 activations) the FP8 reference runs; GPU tests skip without CUDA."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from bagel_kernels import KernelOptions, require_fp8_support
from bagel_kernels.fp8_quant import FP8_DTYPE, dequantize_channels
from bagel_model.core.checkpoint import EMA_FILE, CheckpointError
from bagel_model.core.checksums import write_sha256
from bagel_model.pipeline import BagelPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = dict(height=32, width=32, num_inference_steps=3)
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
# Relative L2 error of the FP8 model's final latents against the float32 model's (tiny preset, 64x64, 4 steps;
# measured 2.2e-3 on CPU): e4m3 keeps 3 fraction bits, so each projection is off by ~2^-5 relative at most, and the
# tiny model's residual stream dilutes it.
FP8_REL_ERR = 2e-2


def _pipe(**kw) -> BagelPipeline:
    p = BagelPipeline.from_preset("tiny", **kw)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def fp8():
    return _pipe(quantization="fp8")


@pytest.fixture(scope="module")
def base():
    return _pipe()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == FP8_DTYPE else t


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])) for k in a)


def test_every_projection_is_fp8_with_a_channel_scale_and_nothing_else_is(fp8, base):
    m, ref = fp8.model, base.model
    assert m.is_fp8 and not ref.is_fp8 and m.kernels.quantization == "fp8"
    names = set()
    for i, layer in enumerate(m.language_model.model.layers):
        for path in PROJ:
            for sfx in ("", "_moe_gen"):
                mod_path = path + sfx if path.startswith("self_attn") else path.replace("mlp", "mlp" + sfx)
                mod = layer.get_submodule(mod_path)
                names.add(f"language_model.model.layers.{i}.{mod_path}.weight")
                w = ref.language_model.model.layers[i].get_submodule(mod_path).weight
                assert mod.weight.dtype == FP8_DTYPE and mod.weight_scale.dtype == torch.float32
                assert mod.weight_scale.shape == (w.shape[0],)
                # the codes are quantize_channels of the float weight: within half an e4m3 step per channel
                err = (dequantize_channels(mod.weight, mod.weight_scale) - w).abs()
                assert (err <= w.abs() * 2.0 ** -4 + mod.weight_scale[:, None] * 2.0 ** -9).all()
    for name, p in m.named_parameters():  # embeddings, norms, lm_head, ViT, VAE, vae2llm/llm2vae: untouched
        if name not in names:
            assert p.dtype == torch.float32, name
    # the float copies are gone: a projection weight is a view of its pack's codes
    layer = m.language_model.model.layers[0]
    codes, scale = layer._gate_up.get_fp8()
    assert layer.mlp.gate_proj.weight.data_ptr() == codes.data_ptr()
    assert layer.mlp.gate_proj.weight_scale.data_ptr() == scale.data_ptr()


def test_fp8_text2img_differs_from_the_float_model_within_the_stated_error(fp8, base):
    kw = dict(height=64, width=64, num_inference_steps=4, seed=0)
    a, b = base("a red cube", **kw), fp8("a red cube", **kw)
    assert a.latent_md5s != b.latent_md5s  # its own exactness class
    x, y = a.latents[0], b.latents[0]
    assert torch.isfinite(y).all()
    assert float((y - x).norm() / x.norm()) < FP8_REL_ERR
    assert b.images[0].size == (64, 64)


def test_fp8_batch_invariance_a_request_in_a_batch_of_three_is_bitwise_alone(fp8):
    prompts, seeds = ["a red cube", "a blue ball", "two green cones"], [0, 5, 9]
    batch = fp8(prompts, seed=seeds, **FAST)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        solo = fp8(p, seed=s, **FAST)
        assert batch.latent_md5s[i] == solo.latent_md5s[0] and batch.image_md5s[i] == solo.image_md5s[0]
    assert len(set(batch.latent_md5s)) == 3


def test_fp8_text_modes_decode(fp8):
    out = fp8("describe a cube", mode="text2text", max_new_tokens=4)
    assert isinstance(out.text[0], str)


def test_pipeline_quantization_argument_is_the_kernels_field():
    a = _pipe(quantization="fp8")
    b = _pipe(kernels=KernelOptions(quantization="fp8"))
    assert a.model.kernels == b.model.kernels
    assert _same_state(a.model.state_dict(), b.model.state_dict())
    with pytest.raises(ValueError, match="contradicts"):
        _pipe(kernels=KernelOptions(quantization="fp8"), quantization="none")


def test_to_keeps_the_codes_and_scales(fp8):
    p = _pipe(quantization="fp8")
    before = {k: v.clone() for k, v in p.model.state_dict().items() if v.dtype == FP8_DTYPE or k.endswith("_scale")}
    p.to(torch.bfloat16)
    after = p.model.state_dict()
    assert p.model.dtype == torch.bfloat16 and p.model.is_fp8
    assert all(after[k].dtype == v.dtype and torch.equal(_bits(after[k]), _bits(v)) for k, v in before.items())
    out = p("a red cube", seed=0, **FAST)
    assert torch.isfinite(out.latents[0]).all()


def test_save_load_round_trip_is_bit_for_bit(fp8, tmp_path):
    d = tmp_path / "fp8"
    fp8.save_pretrained(d)
    with open(d / "config.json") as f:
        assert json.load(f)["quantization"]["method"] == "fp8"
    stored = load_file(d / EMA_FILE)
    key = "language_model.model.layers.0.self_attn.q_proj"
    assert stored[key + ".weight"].dtype == FP8_DTYPE and stored[key + ".weight_scale"].dtype == torch.float32
    assert stored["language_model.lm_head.weight"].dtype == torch.float32
    # loads as FP8 whatever the caller's default, without quantizing again
    q = BagelPipeline.from_pretrained(d, kernels=KernelOptions())
    q.set_progress_bar_config(disable=True)
    assert q.model.kernels.quantization == "fp8"
    assert _same_state(fp8.model.state_dict(), q.model.state_dict())
    assert q("a red cube", seed=0, **FAST).latent_md5s == fp8("a red cube", seed=0, **FAST).latent_md5s


def test_a_float_checkpoint_loads_quantized(base, fp8, tmp_path):
    base.save_pretrained(tmp_path / "f32")
    q = BagelPipeline.from_pretrained(tmp_path / "f32", quantization="fp8")
    assert _same_state(fp8.model.state_dict(), q.model.state_dict())  # quantize_channels of the same weights


def _tamper(d, edit) -> None:
    path = os.path.join(d, EMA_FILE)
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)
    write_sha256(path)  # a consistent, but wrong, checkpoint: the loader's checks, not the checksums, must catch it


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "nonfinite"])
def test_bad_fp8_checkpoints_are_checkpoint_errors_naming_the_tensor(fp8, tmp_path, case):
    d = tmp_path / case
    fp8.save_pretrained(d)
    key = "language_model.model.layers.1.mlp_moe_gen.down_proj"
    if case == "missing":
        _tamper(d, lambda sd: sd.pop(key + ".weight_scale"))
        match = "missing keys.*down_proj.weight_scale.*per-output-channel scale"
    elif case == "shape":
        _tamper(d, lambda sd: sd.update({key + ".weight_scale": sd[key + ".weight_scale"][:3].clone()}))
        match = "mis-shaped keys.*down_proj.weight_scale"
    elif case == "dtype":
        _tamper(d, lambda sd: sd.update({key + ".weight": sd[key + ".weight"].float()}))
        match = "down_proj.weight: checkpoint torch.float32 vs model torch.float8_e4m3fn"
    else:
        def nan(sd):
            s = sd[key + ".weight_scale"].clone()
            s[0] = float("nan")
            sd[key + ".weight_scale"] = s
        _tamper(d, nan)
        match = "non-finite.*down_proj.weight_scale"
    with pytest.raises(CheckpointError, match=match):
        BagelPipeline.from_pretrained(d)


def test_unknown_quantization_names_are_errors(tmp_path, base):
    with pytest.raises(ValueError, match=r"unknown kernel quantization 'int8'; expected one of \('none', 'fp8'\)"):
        KernelOptions(quantization="int8")
    with pytest.raises(ValueError, match="'int8'"):
        BagelPipeline.from_preset("tiny", quantization="int8")
    base.save_pretrained(tmp_path / "q")
    with open(tmp_path / "q" / "config.json") as f:
        top = json.load(f)
    top["quantization"] = {"method": "int4"}
    with open(tmp_path / "q" / "config.json", "w") as f:
        json.dump(top, f)
    with pytest.raises(CheckpointError, match="unknown quantization.*int4"):
        BagelPipeline.from_pretrained(tmp_path / "q")
    from bagel_model.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prompt", "x", "--quantization", "int8"])
    with pytest.raises(ValueError, match=r"unknown kernel fp8 accumulation 'slow'; expected one of \('promoted', "):
        KernelOptions(fp8_accumulation="slow")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prompt", "x", "--fp8-accumulation", "slow"])


def test_an_fp8_model_run_without_fp8_kernels_is_a_clear_error(fp8):
    m = fp8.model
    old = m.kernels
    try:
        m.kernels = KernelOptions()
        with pytest.raises(RuntimeError, match="weights are FP8 codes"):
            fp8("a red cube", seed=0, **FAST)
    finally:
        m.kernels = old


def test_fp32_activations_are_the_reference_only():
    from bagel_kernels.fp8_quant import quantize_channels, quantize_rows
    from bagel_kernels.routed_linear_fp8_reference import check_fp8_routed

    xq, xs = quantize_rows(torch.randn(4, 32))
    wq, ws = quantize_channels(torch.randn(1, 1, 8, 32))
    with pytest.raises(TypeError, match="bf16 or fp16"):
        check_fp8_routed(xq, xs, None, wq, ws, None, None, None, torch.float32)
    check_fp8_routed(xq, xs, None, wq, ws, None, None, None, torch.float32, allow_fp32=True)


def test_fp8_on_a_gpu_without_fp8_tensor_cores_fails_early_naming_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "NVIDIA A100-SXM4-80GB")
    fp8 = KernelOptions(quantization="fp8")
    with pytest.raises(RuntimeError, match=r"A100.*compute capability 8\.0.*>= 8\.9"):
        require_fp8_support(fp8, torch.device("cuda:0"), torch.bfloat16)
    require_fp8_support(KernelOptions(), torch.device("cuda:0"), torch.bfloat16)  # none: nothing to check
    require_fp8_support(KernelOptions(quantization="fp8", backend="reference"), torch.device("cuda:0"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    with pytest.raises(ValueError, match="bf16 or fp16"):
        require_fp8_support(fp8, torch.device("cuda:0"), torch.float32)
    # the model checks before allocating (BagelModel.random), not in the first forward
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (7, 5))
    with pytest.raises(RuntimeError, match="A100"):
        BagelModel.random(BagelConfig.preset("tiny"), device="cuda:0", dtype=torch.bfloat16, kernels=fp8)


# ---------------------------------------------------------------- GPU (skip without CUDA)

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
gpu_fp8 = pytest.mark.skipif(not ON_GPU or (ON_GPU and torch.cuda.get_device_capability() < (8, 9)),
                             reason="needs a GPU with FP8 tensor cores: TRITON_INTERPRET=0 pytest ... on the GPU")


@gpu_fp8
@pytest.mark.parametrize("accumulation", ["promoted", "fast"])
def test_gpu_fp8_pipeline_is_batch_invariant_and_close_to_bf16(accumulation):
    p = BagelPipeline.from_preset("tiny", device="cuda",
                                  kernels=KernelOptions(quantization="fp8", fp8_accumulation=accumulation))
    p.set_progress_bar_config(disable=True)
    ref = BagelPipeline.from_preset("tiny", device="cuda")
    ref.set_progress_bar_config(disable=True)
    prompts, seeds = ["a red cube", "a blue ball", "two green cones"], [0, 5, 9]
    batch = p(prompts, seed=seeds, **FAST)
    for i, (pr, s) in enumerate(zip(prompts, seeds)):
        assert batch.latent_md5s[i] == p(pr, seed=s, **FAST).latent_md5s[0]
    x, y = ref("a red cube", seed=0, **FAST).latents[0], batch.latents[0]
    assert float((y - x).norm() / x.norm()) < 5 * FP8_REL_ERR  # bf16 activations on top of the FP8 error


@gpu_fp8
def test_gpu_fp8_pipeline_matches_the_reference_backend_to_rounding():
    kw = dict(device="cuda", quantization="fp8")
    a = BagelPipeline.from_preset("tiny", **kw)
    b = BagelPipeline.from_preset("tiny", kernels=KernelOptions(backend="reference"), **kw)
    for p in (a, b):
        p.set_progress_bar_config(disable=True)
    x, y = a("a red cube", seed=0, **FAST).latents[0], b("a red cube", seed=0, **FAST).latents[0]
    assert float((y - x).norm() / x.norm()) < FP8_REL_ERR


# ---------------------------------------------------------------- the gloo sweep in FP8

@pytest.mark.slow
def test_fp8_sweep_every_exact_config_matches_single(tmp_path, base):
    out = tmp_path / "sweep.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29652",
           "-m", "parallel.sweep", "--quantization", "fp8", "--steps", "3", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r["config"]: r for r in res["rows"]}
    single = rows["single"]["md5"]
    exact = [r for r in res["rows"] if r["mode"] == "exact" and r["config"] != "single"]
    assert exact and all(r["match"] and r["md5"] == single for r in exact), [(r["config"], r["md5"]) for r in exact]
    # the sweep ran FP8: its single-device result is the FP8 pipeline's, not the float one's
    h, w = res["size"]
    kw = dict(height=h, width=w, num_inference_steps=3, seed=0)
    assert _pipe(quantization="fp8")("a red cube", **kw).latent_md5s[0] == single
    assert base("a red cube", **kw).latent_md5s[0] != single


def test_memory_check_counts_fp8_projection_weights():
    """A 24 GB card fits BAGEL-7B-MoT with FP8 projections, not in bf16: the estimate counts one byte per projection
    weight, an fp32 scale per output channel, and one float layer in flight while the model is placed (measured on
    an H100, 2026-12-07: 27.56 GiB after a bf16 build, 15.47 GiB after an FP8 build whose peak was 16.59 GiB)."""
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.memory import InsufficientMemoryError, check_fits, weight_bytes

    cfg = BagelConfig.preset("bagel-7b-mot")
    bf16, fp8 = weight_bytes(cfg, torch.bfloat16), weight_bytes(cfg, torch.bfloat16, "fp8")
    assert 27 * 2**30 < bf16 < 28 * 2**30 and 15.5 * 2**30 < fp8 < 16.6 * 2**30
    card = 22 * 2**30  # free on a 24 GB card
    assert check_fits(cfg, torch.bfloat16, "cpu", available=card, quantization="fp8") == fp8
    with pytest.raises(InsufficientMemoryError, match="in bfloat16 needs ~27.4 GiB"):
        check_fits(cfg, torch.bfloat16, "cpu", available=card)
    with pytest.raises(InsufficientMemoryError, match="with FP8 projections needs ~16.1 GiB"):
        check_fits(cfg, torch.bfloat16, "cpu", available=8 * 2**30, quantization="fp8")


def test_the_outlier_case_scales_the_same_channels_in_float_and_fp8_models():
    """bench_fp8_e2e --outliers (the accuracy gate's case b): the float model's o_proj/down rows and the FP8 model's
    per-channel scales of the same rows are multiplied by 50, in place (the packs see it), nothing else."""
    from benchmarks.bench_fp8_e2e import OUTLIER_CHANNELS, OUTLIER_SCALE, add_outlier_channels

    rows = list(OUTLIER_CHANNELS)
    for q in ("none", "fp8"):
        pipe = BagelPipeline.from_preset("tiny", quantization=q)
        pipe.set_progress_bar_config(disable=True)
        before = pipe("a red cube", seed=0, **FAST).latent_md5s[0]
        mods = [layer.get_submodule(p) for layer in pipe.model.language_model.model.layers
                for p in ("self_attn.o_proj", "self_attn.o_proj_moe_gen", "mlp.down_proj", "mlp_moe_gen.down_proj")]
        deq = lambda m: m.weight.float() * (m.weight_scale[:, None] if q == "fp8" else 1)  # noqa: E731
        old = [deq(m).clone() for m in mods]
        add_outlier_channels(pipe.model)
        for m, w in zip(mods, old):
            ratio = deq(m) / w
            torch.testing.assert_close(ratio[rows], torch.full_like(ratio[rows], OUTLIER_SCALE), rtol=1e-6, atol=0)
            others = torch.ones(ratio.shape[0], dtype=torch.bool)
            others[rows] = False
            assert torch.equal(deq(m)[others], w[others])
        assert pipe("a red cube", seed=0, **FAST).latent_md5s[0] != before


@gpu_fp8
def test_gpu_fp8_text_decoding_takes_the_small_batch_kernel(monkeypatch):
    """Decode's one-token steps run the FP8 small-batch kernel (every SM streams the weights), and a batch of two
    prompts decodes each prompt's text as it decodes alone."""
    import importlib

    rl8 = importlib.import_module("bagel_kernels.routed_linear_fp8")  # the package's routed_linear_fp8 is the function
    calls = []
    real = rl8.routed_gemm_fp8_small_batch
    monkeypatch.setattr(rl8, "routed_gemm_fp8_small_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    p = BagelPipeline.from_preset("tiny", device="cuda", quantization="fp8")
    p.set_progress_bar_config(disable=True)
    prompts = ["describe a cube", "name three colours"]
    both = p(prompts, mode="text2text", max_new_tokens=6).text
    assert calls and both == [p(q, mode="text2text", max_new_tokens=6).text[0] for q in prompts]
