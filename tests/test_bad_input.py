"""Bad input, one row per class of issue 21: each gives an early error whose text names the problem — never a
traceback from deep inside a library, never a silent wrong image, never a hang.

The CLI rows run ``bagel-generate``'s ``main`` (exit code 2 and the message on stderr) and stop before any model
is built; the library rows call the API directly."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.cli import main

OUT = "{tmp}/x.png"


def _png16(path, value=40000):
    Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(path)  # mode I;16


def _files(tmp):
    """Input files for the rows: empty, text, truncated, a good 32x32 PNG."""
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "text.png").write_text("not an image at all\n")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "good.png")
    data = (tmp / "good.png").read_bytes()
    (tmp / "trunc.png").write_bytes(data[: len(data) // 2])


CLI_ROWS = [
    # (class, arguments, expected error text)
    ("image file", ["--mode", "img2img", "--image", "{tmp}/empty.png"], "is empty (0 bytes)"),
    ("image file", ["--mode", "img2img", "--image", "{tmp}/text.png"], "{tmp}/text.png is not an image file"),
    ("image file", ["--mode", "img2img", "--image", "{tmp}/trunc.png"], "{tmp}/trunc.png is truncated or corrupt"),
    ("image file", ["--mode", "img2img", "--image", "{tmp}/nope.png"], "input image not found: {tmp}/nope.png"),
    ("cli", ["--image", "{tmp}/good.png"], "--image is for --mode img2img or img2text"),
    ("cli", ["--mode", "img2img", "--image", "{tmp}/good.png", "--size", "32"], "--size is for --mode text2img"),
    ("cli", ["--seed", str(2**64)], "--seed must be in [0, 2**64)"),
    ("cli", ["--seed", "-1"], "--seed must be in [0, 2**64)"),
    ("cli", ["--threads", "0"], "--threads must be >= 1"),
    ("cli", ["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    ("cli", ["--device", "tpu"], "--device 'tpu' is not a torch device"),
    ("cli", ["--device", "mps"], "only cpu and cuda"),
    ("cli", ["--config", "bogus"], "invalid choice: 'bogus'"),
    ("cli", ["--kv-layout", "bogus"], "invalid choice: 'bogus'"),
    ("cli", ["--prompt", "x" * 5000], "positions; tiny has 4096"),
    ("cli", ["--out", "{tmp}/x.unknownext"], "cannot tell the image format"),
    ("out", ["--out", "{tmp}/good.png/x.png"], "cannot create the output directory"),  # its parent is a file
    ("out", ["--out", "{tmp}"], "is a directory"),
    ("values", ["--timestep-shift", "nan"], "--timestep-shift must be a finite number"),
    ("values", ["--cfg-text-scale", "inf"], "--cfg-text-scale must be a finite number"),
    ("values", ["--cfg-img-scale=-inf"], "--cfg-img-scale must be a finite number"),
    ("values", ["--cfg-interval", "nan", "1"], "--cfg-interval must be finite"),
    ("cli", ["--prompt", "x", "--prompts-file", "{tmp}/p.txt"], "argument --prompts-file: not allowed with argument --prompt"),
    ("cli", ["--prompt", "x", "--prompt-ids", "5"], "argument --prompt-ids: not allowed with argument --prompt"),
    ("cli", ["--kv-layout", "flash_attn"], "--kv-layout is the diffusion stage's layout under --split"),
    ("checkpoint", ["--checkpoint", "{tmp}/nockpt"], "checkpoint directory not found"),
    ("checkpoint", ["--checkpoint", "{tmp}"], "llm_config.json, vit_config.json, config.json are missing"),
    ("memory", ["--config", "bagel-7b-mot", "--dtype", "fp32"], "needs ~54.7 GiB for its weights"),
]


@pytest.mark.parametrize("cls,args,msg", CLI_ROWS, ids=[f"{r[0]}:{' '.join(r[1])[:40]}" for r in CLI_ROWS])
def test_cli_bad_input_is_a_clear_early_error(tmp_path, capsys, monkeypatch, cls, args, msg):
    _files(tmp_path)
    if cls == "memory":  # the same refusal on any machine: pretend the host has 16 GiB available
        monkeypatch.setattr("bagel_model.core.memory.available_bytes", lambda device: 16 * 2**30)
    fill = lambda a: a.replace("{tmp}", str(tmp_path))
    argv = [fill(a) for a in args]
    if "--out" not in argv:
        argv += ["--out", fill(OUT)]
    assert main(argv + ["--steps", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert fill(msg) in err, err
    assert "Traceback" not in err
    if cls != "out":
        assert not os.path.exists(fill(OUT))  # nothing written for a refused request


def test_out_format_follows_the_suffix(tmp_path, capsys):
    out = tmp_path / "x.jpg"
    assert main(["--steps", "2", "--size", "32", "--out", str(out), "--no-progress"]) == 0
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    text = capsys.readouterr().out
    import hashlib

    assert f"file   md5 {hashlib.md5(out.read_bytes()).hexdigest()}" in text  # what md5sum prints
    assert "latent md5" in text and "pixels md5" in text


# ---- image files are read as upstream BAGEL reads them -------------------------------------------------------
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    from bagel_model.core.image_io import read_image

    _png16(tmp_path / "g16.png", 40000)
    img = read_image(str(tmp_path / "g16.png"))
    assert img.shape == (16, 16, 3) and int(img[0, 0, 0]) == round(40000 / 257)  # 156, not 255 (clipped white)


def test_exif_orientation_is_applied(tmp_path):
    from bagel_model.core.image_io import read_image

    a = np.zeros((16, 32, 3), np.uint8)
    a[:, :16] = 255  # left half white
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    im.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    img = read_image(str(tmp_path / "rot.jpg"))
    assert img.shape == (32, 16, 3)  # upright: portrait
    assert img[:8].float().mean() > 200 and img[-8:].float().mean() < 50  # the white half is now on top


def test_transparency_is_composited_over_white_as_upstream(tmp_path):
    from bagel_model.core.image_io import read_image

    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = 0
    a[:8, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    img = read_image(str(tmp_path / "a.png"))
    assert img[0, 0].tolist() == [200, 0, 0] and img[-1, -1].tolist() == [255, 255, 255]


# ---- library rows ------------------------------------------------------------------------------------------
def _params(**kw):
    from bagel_model.core.sampling import SamplingParams

    return SamplingParams(**{"steps": 2, "height": 32, "width": 32, **kw})


@pytest.mark.parametrize("kw,msg", [
    (dict(timestep_shift=math.nan), "timestep_shift must be a finite number"),
    (dict(cfg_text_scale=math.inf), "cfg_text_scale must be a finite number"),
    (dict(cfg_renorm_min=math.nan), "cfg_renorm_min must be a finite number"),
    (dict(cfg_interval=(math.nan, 1.0)), "cfg_interval must be two finite numbers"),
    (dict(seed=2**64), "seed must be an integer in [0, 2**64)"),
])
def test_non_finite_and_out_of_range_parameters_are_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        _params(**kw).validate()


@pytest.mark.parametrize("where", ["latent", "weights"])
def test_a_non_finite_latent_fails_naming_the_first_bad_step(tiny_model, tokenizer, where):
    from bagel_model.engine.denoise import denoise
    from bagel_model.engine.finite_guard import NonFiniteLatentError
    from bagel_model.engine.step import PackedStep
    from helpers import t2i_request

    r = t2i_request(tiny_model, tokenizer, "a red cube", _params(steps=3))  # two Euler steps: 0 and 1
    engine = PackedStep(tiny_model)
    if where == "latent":
        r.x[3, 5] = math.nan
        bad = engine
    else:  # a velocity that turns non-finite at step 1 (as NaN weights or an Inf scale would make it)
        calls = []

        def bad(jobs, xs, ts):
            calls.append(ts)
            return [v * (math.inf if len(calls) > 1 else 1.0) for v in engine(jobs, xs, ts)]
    with pytest.raises(NonFiniteLatentError, match=f"at denoise step {0 if where == 'latent' else 1} of 2"):
        denoise([r], bad, progress=False)


def _ckpt(tmp, tiny_model, tokenizer):
    from bagel_model.core.checkpoint import save_pretrained

    save_pretrained(tiny_model, str(tmp), tokenizer)
    for f in tmp.glob("*.sha256"):  # as released (no checksums): the structural checks below must name the damage
        f.unlink()
    return tmp


@pytest.mark.parametrize("damage,msg", [
    ("no tokenizer", "tokenizer.json is missing"),
    ("empty ema", "ema.safetensors is empty"),
    ("truncated ema", "is not a readable safetensors file"),
    ("bad json", "config.json is not valid JSON"),
    ("no vit config", "vit_config.json is missing"),
    ("nan weight", "non-finite (NaN/Inf) tensors (1): llm2vae.weight"),
    ("int weight", "wrongly typed tensors (1): vae2llm.bias: checkpoint torch.int64"),
])
def test_checkpoint_damage_is_named(tmp_path, tiny_model, tokenizer, damage, msg):
    from safetensors.torch import load_file, save_file

    from bagel_model.core.checkpoint import from_pretrained

    d = _ckpt(tmp_path, tiny_model, tokenizer)
    ema = d / "ema.safetensors"
    if damage == "no tokenizer":
        os.remove(d / "tokenizer.json")
    elif damage == "empty ema":
        ema.write_bytes(b"")
    elif damage == "truncated ema":
        ema.write_bytes(ema.read_bytes()[:1000])
    elif damage == "bad json":
        (d / "config.json").write_text("{not json")
    elif damage == "no vit config":
        os.remove(d / "vit_config.json")
    else:
        sd = load_file(str(ema))
        if damage == "nan weight":
            sd["llm2vae.weight"][0, 0] = math.nan
        else:
            sd["vae2llm.bias"] = sd["vae2llm.bias"].to(torch.int64)
        save_file(sd, str(ema))
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        from_pretrained(str(d))
    assert msg in str(e.value), str(e.value)
    if damage == "no tokenizer":  # the explicit opt-in loads it with the byte-level tokenizer
        from_pretrained(str(d), byte_tokenizer=True)


@pytest.mark.parametrize("call,msg", [
    (dict(gqa_group=0), "gqa_group must be a positive integer"),
    (dict(gqa_group=-3), "gqa_group must be a positive integer"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32), max_seqlen_q=5), "cu_seqlens_q ends at 9, beyond the 8 rows"),
    (dict(seg_seqlens=torch.tensor([7], dtype=torch.int32)), "seqlens [7] exceed the rows the KV holds [6]"),
    (dict(paged_seqlens=torch.tensor([40], dtype=torch.int32)), "paged seqlens [40] exceed the 32 slots"),
])
def test_kernel_api_rejects_out_of_range_indices(call, msg):
    import bagel_kernels as bk

    q = torch.randn(8, 4, 16)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    call = dict(call)
    if "seg_seqlens" in call:
        segs = [bk.ContiguousKV(k, v, cu_seqlens=torch.tensor([0, 6], dtype=torch.int32), seqlens=call.pop("seg_seqlens"))]
    elif "paged_seqlens" in call:
        kp, vp = torch.randn(4, 16, 2, 16), torch.randn(4, 16, 2, 16)
        segs = [bk.PagedKV(kp, vp, torch.tensor([[0, 1]], dtype=torch.int32), call.pop("paged_seqlens")),
                bk.ContiguousKV(k, v)]
    else:
        segs = [bk.ContiguousKV(k, v, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32), max_seqlen=3)]
    with pytest.raises(ValueError) as e:
        bk.joint_attention(q, segs, options=bk.KernelOptions(backend="reference"), **call)
    assert msg in str(e.value), str(e.value)


def test_sweep_rejects_an_empty_selection_and_bad_layers(capsys):
    from parallel.sweep import main as sweep

    with pytest.raises(SystemExit) as e:
        sweep(["--only", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config(s) ['bogus']" in err and "valid names for world 1: single" in err
    for bad, msg in ((["--layers", "-1"], "--layers must be in 1..2"), (["--only", ","], "selects nothing"),
                     (["--threads", "0"], "--threads must be >= 1")):
        with pytest.raises(SystemExit):
            sweep(bad)
        assert msg in capsys.readouterr().err


# ---- issue 29: the last silent results and misnamed errors of the kernel API ---------------------------------
def _kernel_call(case):
    """(q, segments, keyword arguments) of one bad kernel call."""
    import bagel_kernels as bk

    q = torch.randn(8, 4, 16)
    k, v = torch.randn(6, 2, 16), torch.randn(6, 2, 16)
    if case == "page past the pool":  # an all-zero pool of 4 pages, a table naming page 9
        kp, vp = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
        return q, [bk.PagedKV(kp, vp, torch.tensor([[0, 9]], dtype=torch.int32), torch.tensor([32], dtype=torch.int32))], {}
    if case == "negative page":
        kp, vp = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
        return q, [bk.PagedKV(kp, vp, torch.tensor([[-1, 0]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32))], {}
    if case == "scale inf":
        return q, [bk.ContiguousKV(k, v)], dict(scale=math.inf)
    if case == "max_seqlen_q short":  # one sequence of 8 rows, bound 4: rows 4..7 would be left uncomputed
        return q, [bk.ContiguousKV(k, v)], dict(max_seqlen_q=4)
    if case == "kv numpy":
        return q, [bk.ContiguousKV(k.numpy(), v.numpy())], {}
    if case == "v head_dim":
        return q, [bk.ContiguousKV(k, v[..., :8])], {}
    raise AssertionError(case)


KERNEL_ROWS = [
    ("page past the pool", "block_table holds page id(s) [9] outside the pool of 4 pages"),
    ("negative page", "block_table holds page id(s) [-1] outside the pool of 4 pages"),
    ("scale inf", "softmax scale must be positive and finite, got inf"),
    ("max_seqlen_q short", "max_seqlen_q 4 is smaller than the single sequence's 8 query rows"),
    ("kv numpy", "K/V must be torch tensors, got numpy.ndarray"),
    ("v head_dim", "V head_dim 8 does not match q's head_dim 16"),
]


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case,msg", KERNEL_ROWS, ids=[r[0] for r in KERNEL_ROWS])
def test_kernel_arguments_that_gave_wrong_numbers_are_named(case, msg, backend):
    """Each backend refuses before launching: the Triton kernel (interpreter) read pages it does not own and
    returned non-zero rows from an all-zero pool; scale=inf gave NaN rows; a short max_seqlen_q wrong rows."""
    import bagel_kernels as bk

    q, segs, kw = _kernel_call(case)
    with pytest.raises((ValueError, TypeError)) as e:
        bk.joint_attention(q, segs, options=bk.KernelOptions(backend=backend), **kw)
    assert msg in str(e.value), str(e.value)


def test_device_block_tables_have_an_explicit_debug_check():
    """A GPU block table is a precondition joint_attention does not read (no sync in the denoise loop);
    ``check_block_tables`` is the explicit check. Shown on CPU tables here (the same code path)."""
    import bagel_kernels as bk

    _, segs, _ = _kernel_call("page past the pool")
    with pytest.raises(ValueError, match=r"page id\(s\) \[9\] outside the pool of 4 pages"):
        bk.check_block_tables(segs)
    kp, vp = torch.zeros(4, 16, 2, 16), torch.zeros(4, 16, 2, 16)
    bk.check_block_tables([bk.PagedKV(kp, vp, torch.tensor([[3, 0]], dtype=torch.int32), torch.tensor([20], dtype=torch.int32))])


@pytest.mark.parametrize("theta", [0.0, -1.0, math.inf, math.nan])
def test_rope_theta_that_gives_nan_tables_is_rejected(theta):
    import bagel_kernels as bk

    with pytest.raises(ValueError, match="rope_theta"):
        bk.rope_cos_sin(torch.arange(4), 8, theta)


def test_rope_theta_zero_in_a_config_is_rejected(tiny_cfg):
    import copy

    from bagel_model.core.config import ConfigError

    cfg = copy.deepcopy(tiny_cfg)
    cfg.llm.rope_theta = 0.0
    if getattr(cfg.llm, "rope_parameters", None):
        cfg.llm.rope_parameters["rope_theta"] = 0.0
    with pytest.raises(ConfigError, match="rope_theta must be a finite number > 1, got 0.0"):
        cfg.validate()


def test_lse_merge_shape_mismatch_is_named():
    import bagel_kernels as bk

    with pytest.raises(ValueError, match=r"outputs must both be \(T, H, D\), got \(4, 2, 8\) and \(3, 2, 8\)"):
        bk.merge_attention_partials(torch.zeros(4, 2, 8), torch.zeros(4, 2), torch.zeros(3, 2, 8), torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"lse must be \(T, H\) = \(4, 2\)"):
        bk.merge_attention_partials(torch.zeros(4, 2, 8), torch.zeros(4, 2), torch.zeros(4, 2, 8), torch.zeros(2, 4))


@pytest.mark.parametrize("degree", [2.0, "2", True])
def test_a_non_integer_parallel_degree_is_named(degree):
    from parallel.mesh import ParallelConfig

    with pytest.raises(ValueError, match=f"ulysses degree must be an integer, got {degree!r}"):
        ParallelConfig(ulysses=degree).validate(4)
