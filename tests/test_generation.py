"""Text-to-image on the tiny preset: determinism, CFG, schedule, no host syncs, bad inputs."""
import pytest
import torch

from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.cfg import combine_cfg
from bagel_model.engine.denoise import branches_at, denoise, timestep_schedule
from bagel_model.engine.finite_guard import FiniteGuard
from bagel_model.oracle import PerBranchStep, branch_velocity
from bagel_model.pipeline import BagelPipeline
from bagel_model.runtime.sync_guard import HostSyncError, forbid_host_sync
from bagel_model.serving.stages import Request
from helpers import t2i_contexts, t2i_request


def t2i(pipe, prompt, params):
    return pipe.generate(Request("text2img", prompt, params))[1]


def small_params(**kw):
    p = dict(steps=4, seed=0, height=48, width=64, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0))
    p.update(kw)
    return SamplingParams(**p)


def test_two_runs_are_bit_identical(tiny_model, tokenizer):
    pipe = BagelPipeline(tiny_model, tokenizer)
    a = t2i(pipe, "a red cube", small_params())
    b = t2i(pipe, "a red cube", small_params())
    assert a.latent.shape == (3 * 4, 64) and a.image.shape == (48, 64, 3) and a.image.dtype == torch.uint8
    assert a.latent_md5 == b.latent_md5 and a.image_md5 == b.image_md5
    assert torch.isfinite(a.latent).all()


def test_seed_and_prompt_change_the_result(tiny_model, tokenizer):
    pipe = BagelPipeline(tiny_model, tokenizer)
    base = t2i(pipe, "a red cube", small_params()).latent_md5
    assert t2i(pipe, "a red cube", small_params(seed=1)).latent_md5 != base
    assert t2i(pipe, "a blue ball", small_params()).latent_md5 != base


def test_schedule_is_shifted_and_host_float():
    ts, dts = timestep_schedule(5, 3.0)
    assert all(isinstance(t, float) for t in ts + dts)
    assert ts[0] == 1.0 and len(ts) == 4
    t = 0.75
    assert ts[1] == pytest.approx(3 * t / (1 + 2 * t), rel=1e-6)
    assert sum(dts) == pytest.approx(1.0, rel=1e-6)


def test_cfg_interval_counts_like_bagel():
    """50 timesteps with interval (0.4, 1.0] and shift 3: 41 of 49 steps use CFG (docs/DESIGN.md §1)."""
    p = SamplingParams(steps=50)
    ts, _ = timestep_schedule(50, 3.0)
    assert sum(len(branches_at(t, p)) == 3 for t in ts) == 41
    assert branches_at(0.3, p) == ("full",)
    assert branches_at(0.9, SamplingParams(cfg_img_scale=1.0)) == ("full", "text")


def test_cfg_combine_formulas():
    g = torch.Generator().manual_seed(0)
    v, vt, vi = (torch.randn(6, 4, generator=g) for _ in range(3))
    st, si = 4.0, 1.5
    vtp = vt + st * (v - vt)
    out = combine_cfg(v, vt, vi, text_scale=st, img_scale=si, renorm_min=0.0, renorm_type="global")
    want = vi + si * (vtp - vi)
    want = want * (v.norm() / (want.norm() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(out, want)
    out = combine_cfg(v, vt, vi, text_scale=st, img_scale=si, renorm_min=0.0, renorm_type="text_channel")
    vT = vtp * (v.norm(dim=-1, keepdim=True) / (vtp.norm(dim=-1, keepdim=True) + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(out, vi + si * (vT - vi))
    assert combine_cfg(v, None, None, text_scale=1.0, img_scale=1.0, renorm_min=0, renorm_type="global") is v
    with pytest.raises(ValueError, match="renorm type"):
        combine_cfg(v, vt, vi, text_scale=st, img_scale=si, renorm_min=0.0, renorm_type="bogus")


def test_t2i_no_image_branch_is_the_full_branch(tiny_model, tokenizer):
    """Text-to-image has no input image: its no-image context IS the full one (one job of the step), and the no-text
    branch differs."""
    ctx = t2i_contexts(tiny_model, tokenizer, "a red cube")
    assert ctx["img"] is ctx["full"] and ctx["text"].length == 0
    x = torch.randn(4, 64)
    full, text = (branch_velocity(tiny_model, x, 0.8, (2, 2), ctx[b], 16) for b in ("full", "text"))
    assert not torch.equal(full, text)


def test_denoise_loop_and_layers_make_no_host_reads(tiny_model, tokenizer):
    p = small_params()
    r = t2i_request(tiny_model, tokenizer, "a red cube", p)
    r.schedule = timestep_schedule(p.steps, p.timestep_shift)  # host floats, made before the region
    guard = FiniteGuard()
    with forbid_host_sync(cuda=False):
        (x,) = denoise([r], PerBranchStep(tiny_model), progress=True, guards=[guard])
    guard.check()  # the non-finite check reads its device flag once, after the loop
    assert x.shape == r.x.shape


def test_guard_catches_a_host_read():
    with pytest.raises(HostSyncError, match="item"):
        with forbid_host_sync(cuda=False):
            torch.ones(2).sum().item()
    assert torch.ones(1).item() == 1.0  # restored afterwards


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt_is_rejected(tiny_model, tokenizer, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        t2i(BagelPipeline(tiny_model, tokenizer), prompt, small_params())


@pytest.mark.parametrize("bad,msg", [(dict(steps=1), "steps"), (dict(cfg_renorm_type="x"), "renorm"),
                                     (dict(cfg_interval=(0.8, 0.2)), "cfg_interval"), (dict(height=40), "multiple of 16")])
def test_bad_sampling_params(tiny_model, tokenizer, bad, msg):
    with pytest.raises(ValueError, match=msg):
        t2i(BagelPipeline(tiny_model, tokenizer), "a cube", small_params(**bad))
