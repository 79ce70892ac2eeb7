"""BagelPipeline as a diffusers user calls it: from_pretrained / save_pretrained / to, and pipe(prompt, ...)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from bagel_model.core.sampling import SamplingParams, resolve_sampling
from bagel_model.engine.denoise import timestep_schedule
from bagel_model.pipeline import BagelPipeline, BagelPipelineOutput
from bagel_model.serving.stages import Request

FAST = dict(height=32, width=32, num_inference_steps=3)  # two Euler updates on a 2x2 latent grid


@pytest.fixture(scope="module")
def pipe():
    p = BagelPipeline.from_pretrained("tiny")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def photo():
    """A 48x40 RGB picture with structure in every channel (not a multiple of the latent stride)."""
    y, x = np.mgrid[0:48, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 5, (x * y) % 251], axis=-1).astype(np.uint8))


def test_text_to_image_pil_out_is_the_request_api_result(pipe):
    out = pipe("a red cube", seed=3, **FAST)
    assert isinstance(out, BagelPipelineOutput)
    assert isinstance(out.images[0], Image.Image) and out.images[0].size == (32, 32) and out.text == [""]
    params = resolve_sampling(pipe.model.cfg, "text2img", steps=3, seed=3, height=32, width=32)
    _, r1 = pipe.generate(Request("text2img", "a red cube", params))
    assert out.latent_md5s == [r1.latent_md5] and out.image_md5s == [r1.image_md5]
    assert torch.equal(out.latents[0], r1.latent)
    assert np.array_equal(np.asarray(out.images[0]), r1.image.numpy())


def test_pil_in_pil_out_edits_at_the_resized_input_size(pipe, photo):
    out = pipe("make it blue", image=photo, num_inference_steps=3, seed=1)
    from bagel_model.core.transforms import vae_resize_rule

    h, w = vae_resize_rule(pipe.model.cfg).output_size(48, 40)
    assert out.images[0].size == (w, h)
    again = pipe("make it blue", image=np.asarray(photo), mode="img2img", num_inference_steps=3, seed=1)
    assert again.latent_md5s == out.latent_md5s


def test_output_types_hold_the_same_pixels(pipe):
    pil = pipe("a red cube", **FAST).images[0]
    npy = pipe("a red cube", output_type="np", **FAST).images[0]
    pt = pipe("a red cube", output_type="pt", **FAST).images[0]
    assert npy.shape == (32, 32, 3) and npy.dtype == np.float32 and 0.0 <= npy.min() <= npy.max() <= 1.0
    assert pt.shape == (3, 32, 32) and pt.dtype == torch.float32
    exact = np.asarray(pil)
    assert np.array_equal(np.round(npy * 255).astype(np.uint8), exact)
    assert np.array_equal(torch.round(pt * 255).to(torch.uint8).permute(1, 2, 0).numpy(), exact)


def test_a_list_of_prompts_gives_each_prompt_its_solo_result(pipe):
    prompts, seeds = ["a red cube", "a blue ball", "two green cones"], [0, 5, 9]
    batch = pipe(prompts, seed=seeds, **FAST)
    assert len(batch.images) == len(batch.latents) == len(batch.text) == 3
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        solo = pipe(p, seed=s, **FAST)
        assert batch.latent_md5s[i] == solo.latent_md5s[0] and batch.image_md5s[i] == solo.image_md5s[0]
    assert len(set(batch.latent_md5s)) == 3
    same_seed = pipe(prompts[:2], seed=5, **FAST)  # one seed: each prompt as it is alone with that seed
    assert same_seed.latent_md5s[1] == batch.latent_md5s[1]


def test_generator_gives_its_initial_seed_on_any_state(pipe):
    g = torch.Generator().manual_seed(7)
    torch.randn(4, generator=g)  # BAGEL seeds its own CPU generator from initial_seed(): drawing changes nothing
    assert pipe("a red cube", generator=g, **FAST).latent_md5s == pipe("a red cube", seed=7, **FAST).latent_md5s
    two = pipe(["a", "b"], generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)], **FAST)
    assert two.latent_md5s[1] == pipe("b", seed=2, **FAST).latent_md5s[0]
    with pytest.raises(ValueError, match="seed or generator, not both"):
        pipe("a", seed=1, generator=g, **FAST)


def test_callback_on_step_end_gets_diffusers_arguments_once_per_step_per_request(pipe):
    calls = []

    def callback(p, step, timestep, callback_kwargs):
        calls.append((p, step, timestep, dict(callback_kwargs)))
        return callback_kwargs

    out = pipe(["a red cube", "a blue ball"], seed=[0, 1], callback_on_step_end=callback, **FAST)
    ts, _ = timestep_schedule(3, resolve_sampling(pipe.model.cfg).timestep_shift)
    for i in (0, 1):
        mine = [(s, t) for p, s, t, kw in calls if kw == {"request_index": i} and p is pipe]
        assert mine == list(enumerate(ts))  # steps 0..N-2 with BAGEL's shifted t of each update
    assert len(calls) == 4
    assert out.latent_md5s == pipe(["a red cube", "a blue ball"], seed=[0, 1], **FAST).latent_md5s
    with pytest.raises(ValueError, match="a latent must be"):  # a returned latent of the wrong shape
        pipe("a", callback_on_step_end=lambda p, s, t, kw: {"latents": torch.zeros(1)}, **FAST)
    with pytest.raises(ValueError, match="only tensor input"):
        pipe("a", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"], **FAST)


def test_callback_sees_the_latents_and_may_replace_them(pipe):
    """diffusers' contract: callback_on_step_end_tensor_inputs=["latents"] hands each request's latent after the
    update; returning it unchanged keeps the bits, returning a new one steers the rest of the run."""
    seen = []

    def look(p, step, t, kw):
        seen.append((kw["request_index"], step, kw["latents"].shape, kw["latents"].dtype))
        return kw

    base = pipe("a red cube", **FAST)
    out = pipe("a red cube", callback_on_step_end=look, callback_on_step_end_tensor_inputs=["latents"], **FAST)
    assert out.latent_md5s == base.latent_md5s and len(seen) == 2
    assert seen[0][2] == base.latents[0].shape and seen[0][3] == torch.float32
    zeroed = pipe("a red cube", callback_on_step_end=lambda p, s, t, kw: {"latents": kw["latents"] * 0},
                  callback_on_step_end_tensor_inputs=["latents"], **FAST)
    assert torch.count_nonzero(zeroed.latents[0]) == 0  # the last update's latent was replaced by zeros


def test_numpy_integers_are_integers_and_floats_are_not(pipe):
    a = pipe("a red cube", height=np.int64(32), width=np.int32(32), num_inference_steps=np.int64(3), seed=np.uint8(4),
             cfg_text_scale=np.float32(4.0))
    assert a.latent_md5s == pipe("a red cube", seed=4, **FAST).latent_md5s
    with pytest.raises(TypeError, match="num_inference_steps must be an integer"):
        pipe("a red cube", height=32, width=32, num_inference_steps=3.0)


def test_image_layouts_and_dtypes_are_told_apart(pipe, photo):
    hwc = np.array(photo)
    want = pipe("make it blue", image=photo, num_inference_steps=3).latent_md5s
    chw_float = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255  # torchvision ToTensor
    chw_uint8 = torch.from_numpy(hwc).permute(2, 0, 1).contiguous()  # torchvision.io.read_image
    for image in (chw_float, chw_uint8, torch.from_numpy(hwc), hwc.astype(np.float32) / 255, chw_float[None]):
        assert pipe("make it blue", image=image, num_inference_steps=3).latent_md5s == want
    with pytest.raises(ValueError, match="ambiguous"):
        pipe("make it blue", image=torch.rand(3, 40, 3))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        pipe("make it blue", image=chw_float * 255)
    with pytest.raises(ValueError, match="must be uint8"):
        pipe("make it blue", image=hwc.astype(np.int64))


def test_text_modes_answer_in_text(pipe, photo):
    out = pipe("hello", mode="text2text", max_new_tokens=np.int64(4))
    assert out.images == [] and len(out.text) == 1
    r0, _ = pipe.generate(Request("text2text", "hello", SamplingParams(height=32, width=32), max_tokens=4))
    assert out.text == [r0.text]
    assert len(pipe(["a", "b"], image=photo, mode="img2text", max_new_tokens=2).text) == 2
    with pytest.raises(ValueError, match="num_inference_steps would be ignored"):
        pipe("hello", mode="text2text", num_inference_steps=3)


def test_defaults_work_on_the_tiny_preset(pipe):
    out = pipe("a red cube")  # the preset's steps (10) and its whole latent table (256 px)
    assert out.images[0].size == (256, 256)


@pytest.mark.parametrize("call,error,msg", [
    (lambda p: p(5), TypeError, "prompt must be a string"),
    (lambda p: p([], **FAST), TypeError, "prompt must be a string"),
    (lambda p: p("a", output_type="latent", **FAST), ValueError, "output_type must be one of"),
    (lambda p: p("a", mode="draw", **FAST), ValueError, "unknown mode"),
    (lambda p: p("a", mode="img2img"), ValueError, "needs an input image"),
    (lambda p: p("a", image=np.zeros((32, 32, 3), np.uint8), height=32), ValueError, "height and width are for"),
    (lambda p: p("a", image=np.zeros((32, 32, 3), np.uint8), mode="text2img"), ValueError, "takes no input image"),
    (lambda p: p(["a", "b", "c"], seed=[1, 2], **FAST), ValueError, "2 seeds for 3 prompts"),
    (lambda p: p("a", generator=7, **FAST), TypeError, "torch.Generator"),
    (lambda p: p("a", height=40, width=32, num_inference_steps=3), ValueError, "multiple of 16"),
    (lambda p: p("a", height=32, width=32, num_inference_steps=1), ValueError, "steps must be an integer >= 2"),
    (lambda p: p("a", image="/nonexistent/in.png"), FileNotFoundError, "not found"),
    (lambda p: p("a", image=[np.zeros((32, 32, 3), np.uint8)] * 2, num_inference_steps=3), ValueError,
     "2 images for 1 prompts"),
])
def test_bad_input_is_named_before_any_work(pipe, call, error, msg):
    with pytest.raises(error, match=msg):
        call(pipe)


def test_preset_save_load_round_trip_is_bit_identical(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = BagelPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    a, b = pipe("a red cube", **FAST), loaded("a red cube", **FAST)
    assert a.latent_md5s == b.latent_md5s and a.image_md5s == b.image_md5s
    other = BagelPipeline.from_pretrained("tiny", weights_seed=1)
    other.set_progress_bar_config(disable=True)
    assert other("a red cube", **FAST).latent_md5s != a.latent_md5s  # another model, same noise
    with pytest.raises(ValueError, match="weights_seed is for presets"):
        BagelPipeline.from_pretrained(tmp_path, weights_seed=1)
    with pytest.raises(ValueError, match="neither a checkpoint directory, a hub id"):
        BagelPipeline.from_pretrained("tiny-typo")


def _hub_cache(root, repo_id: str, checkpoint_dir, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """A cache laid out as huggingface_hub lays it out: models--{owner}--{name}/refs/main holds the commit,
    snapshots/{commit}/ the files."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(checkpoint_dir, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_hub_id_resolves_through_the_hugging_face_cache_offline(pipe, tmp_path, monkeypatch):
    from huggingface_hub import constants

    pipe.save_pretrained(tmp_path / "ckpt")
    snapshot = _hub_cache(tmp_path / "hub", "ByteDance-Seed/BAGEL-7B-MoT", tmp_path / "ckpt")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what HF_HUB_OFFLINE=1 sets
    hub = BagelPipeline.from_pretrained("ByteDance-Seed/BAGEL-7B-MoT", cache_dir=tmp_path / "hub")
    hub.set_progress_bar_config(disable=True)
    assert hub("a red cube", **FAST).latent_md5s == pipe("a red cube", **FAST).latent_md5s
    assert os.path.isdir(snapshot)


def test_a_hub_id_missing_offline_names_the_id_and_hf_hub_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'ByteDance-Seed/BAGEL-7B-MoT' is not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        BagelPipeline.from_pretrained("ByteDance-Seed/BAGEL-7B-MoT", cache_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        BagelPipeline.from_pretrained("someone/other-model", cache_dir=tmp_path / "empty", local_files_only=True)


def test_to_casts_as_loading_in_that_dtype(tmp_path):
    src = BagelPipeline.from_pretrained("tiny")
    src.save_pretrained(tmp_path)
    moved = BagelPipeline.from_pretrained(tmp_path).to(torch.bfloat16)
    loaded = BagelPipeline.from_pretrained(tmp_path, dtype="bf16")
    assert moved.dtype == torch.bfloat16 and moved.model.vae.decoder.conv_out.weight.dtype == torch.float32
    for p in (moved, loaded):
        p.set_progress_bar_config(disable=True)
    assert moved("a red cube", **FAST).latent_md5s == loaded("a red cube", **FAST).latent_md5s


def test_kernel_options_reach_the_model(tmp_path):
    from bagel_kernels import KernelOptions

    assert BagelPipeline.from_pretrained("tiny", kernels="fast").model.kernels == KernelOptions(mode="fast")
    opts = KernelOptions(backend="reference")
    BagelPipeline.from_pretrained("tiny").save_pretrained(tmp_path)
    assert BagelPipeline.from_pretrained(tmp_path, kernels=opts).model.kernels == opts
    with pytest.raises(ValueError, match="unknown kernel mode"):
        BagelPipeline.from_pretrained("tiny", kernels="fastest")
    with pytest.raises(TypeError, match="KernelOptions or a mode name"):
        BagelPipeline.from_pretrained("tiny", kernels={"mode": "fast"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_cuda_matches_loading_on_cuda(tmp_path):
    BagelPipeline.from_pretrained("tiny").save_pretrained(tmp_path)
    moved = BagelPipeline.from_pretrained(tmp_path).to("cuda", torch.bfloat16)
    loaded = BagelPipeline.from_pretrained(tmp_path, device="cuda", dtype=torch.bfloat16)
    for p in (moved, loaded):
        p.set_progress_bar_config(disable=True)
    assert moved.device.type == "cuda"
    assert moved("a red cube", **FAST).latent_md5s == loaded("a red cube", **FAST).latent_md5s
    back = moved.to("cpu", torch.float32)  # and back: a bf16 model widened on the host still runs
    assert back("a red cube", **FAST).images[0].size == (32, 32)
