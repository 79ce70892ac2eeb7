"""Step caching (engine.cache): per job, per request, and a request's bits the same alone, in a batch with other
policies, and (tests/test_parallel.py) under every parallel configuration; off by default and then changing no bit."""
import math

import numpy as np
import pytest
import torch

from bagel_model.core.sampling import CacheConfig, SamplingParams
from bagel_model.engine import cache
from bagel_model.engine.cache import JobCache, JobStep
from bagel_model.engine.denoise import denoise
from bagel_model.engine.output import tensor_md5
from bagel_model.engine.step import PackedStep
from helpers import t2i_request

FIXED = CacheConfig(policy="fixed", warmup=2, interval=2)


def run(model, tok, specs, engine=None):
    reqs = [t2i_request(model, tok, pr, SamplingParams(**kw)) for pr, kw in specs]
    xs = denoise(reqs, engine or PackedStep(model), progress=False)
    return [tensor_md5(x) for x in xs], [r.cache_stats() for r in reqs], xs


def test_caching_off_changes_nothing(tiny_model, tokenizer):
    spec = [("a red cube", dict(steps=6, height=48, width=80))]
    assert run(tiny_model, tokenizer, spec)[0] == run(tiny_model, tokenizer, [(spec[0][0], dict(
        spec[0][1], cache=CacheConfig()))])[0]


@pytest.mark.parametrize("config", [FIXED, CacheConfig(policy="dbcache", warmup=2, threshold=0.5),
                                    CacheConfig(policy="fixed", warmup=2, interval=2, taylor_order=2)],
                         ids=["fixed", "dbcache", "taylorseer2"])
def test_a_cached_request_reuses_middle_layers_and_stays_close(tiny_model, tokenizer, config):
    base = run(tiny_model, tokenizer, [("a red cube", dict(steps=10, height=48, width=80))])
    got = run(tiny_model, tokenizer, [("a red cube", dict(steps=10, height=48, width=80, cache=config))])
    assert got[0] != base[0] and got[1][0]["reused"] > 0 and got[1][0]["computed"] > 0
    err = float((got[2][0] - base[2][0]).norm() / base[2][0].norm())
    assert 0 < err < 1e-2


def test_a_batch_of_mixed_policies_gives_each_request_its_solo_bits(tiny_model, tokenizer):
    specs = [("a red cube", dict(steps=10, height=48, width=80, cache=replace_taylor(FIXED, 1))),
             ("a blue ball", dict(steps=8, height=32, width=16, seed=3)),
             ("two cones", dict(steps=9, height=16, width=48, seed=5, cfg_interval=(0.0, 1.0),
                                cache=CacheConfig(policy="dbcache", warmup=1, threshold=0.5)))]
    alone = [run(tiny_model, tokenizer, [s]) for s in specs]
    batch = run(tiny_model, tokenizer, specs, PackedStep(tiny_model, max_layouts=2))
    assert batch[0] == [a[0][0] for a in alone]
    assert batch[1] == [a[1][0] for a in alone] and batch[1][1] == {"computed": 0, "reused": 0}


def replace_taylor(c: CacheConfig, order: int) -> CacheConfig:
    from dataclasses import replace

    return replace(c, taylor_order=order)


def test_the_fixed_schedule_is_warmup_tail_and_every_interval():
    c = CacheConfig(policy="fixed", warmup=3, tail=2, interval=3)
    st = JobCache(terms=[torch.zeros(1)])  # a job that has computed before
    computes = [cache.forced(JobStep(k, 20, c, st)) for k in range(20)]
    assert [k for k, v in enumerate(computes) if v] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 19]
    # the default schedule computes at most half of a 50-timestep request's middle-layer steps
    d = CacheConfig.named("fixed")
    assert sum(bool(cache.forced(JobStep(k, 49, d, st))) for k in range(49)) / 49 <= 0.5


def test_dbcache_decides_from_the_numbers_within_its_cap():
    c = CacheConfig(policy="dbcache", warmup=1, max_cached_run=2)
    st = JobCache(terms=[torch.zeros(1)], run=1)
    assert cache.forced(JobStep(0, 10, c, st)) is True  # warm-up
    assert cache.forced(JobStep(5, 10, c, st)) is None  # the statistic decides
    st.run = 2
    assert cache.forced(JobStep(5, 10, c, st)) is True  # at most 2 reused steps in a row
    prev = torch.ones(4, 3)
    assert float(cache.relative_l1(prev * 1.1, prev)) == pytest.approx(0.1)


def test_taylor_terms_extrapolate_a_linear_residual_exactly():
    c = CacheConfig(policy="fixed", taylor_order=1)
    st = JobCache()
    for k in (0, 2):  # computed at steps 0 and 2 of a residual 1 + 0.5 k
        cache.record(JobStep(k, 10, c, st), torch.full((2, 2), 1.0 + 0.5 * k))
    assert torch.allclose(cache.predicted(JobStep(5, 10, c, st)), torch.full((2, 2), 3.5))


@pytest.mark.parametrize("kw,msg", [
    (dict(policy="lru"), "unknown cache policy 'lru'"),
    (dict(policy="dbcache", threshold=-0.1), "threshold must be a finite number >= 0"),
    (dict(policy="dbcache", threshold=math.nan), "threshold must be a finite number >= 0"),
    (dict(policy="fixed", interval=0), "interval must be an integer >= 1"),
    (dict(policy="fixed", taylor_order=3), "taylor_order must be 0, 1 or 2"),
    (dict(policy="fixed", warmup=8, tail=2), "warmup 8 \\+ tail 2 exceed the request's 9 model evaluations"),
])
def test_bad_cache_settings_are_errors_before_any_work(kw, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(steps=10, cache=CacheConfig(**kw)).validate()


def test_front_and_back_must_leave_a_middle(tiny_model, tokenizer):
    r = t2i_request(tiny_model, tokenizer, "x", SamplingParams(steps=4, height=16, width=16,
                                                                 cache=CacheConfig(policy="fixed", warmup=1,
                                                                                   front=1, back=1)))
    with pytest.raises(ValueError, match="front 1 \\+ back 1 leave no middle layer of the model's 2"):
        denoise([r], PackedStep(tiny_model), progress=False)
    with pytest.raises(ValueError, match="unknown cache 'lru'"):
        CacheConfig.named("lru")


def test_the_pipeline_and_the_cli_take_a_cache(tmp_path, capsys):
    from bagel_model.cli import main
    from bagel_model.pipeline import BagelPipeline

    pipe = BagelPipeline.from_preset("tiny")
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red cube", height=32, width=32, num_inference_steps=8, cache="taylorseer")
    assert out.cache_stats[0]["reused"] > 0
    assert main(["--size", "32", "--steps", "8", "--cache", "taylorseer", "--out", str(tmp_path / "c.png"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"latent md5 {out.latent_md5s[0]}" in printed and "step cache: middle layers ran on" in printed
    assert main(["--size", "32", "--cache-threshold", "0.3", "--out", str(tmp_path / "d.png")]) == 2
    assert "need --cache fixed, dbcache or taylorseer" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_batch_of_mixed_policies_gives_each_request_its_solo_bits_on_the_gpu(tokenizer):
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel

    m = BagelModel.random(BagelConfig.preset("tiny"), seed=0, dtype=torch.bfloat16, device="cuda")
    m.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])
    specs = [("a red cube", dict(steps=10, height=64, width=64, cache=FIXED)),
             ("blue", dict(steps=8, height=128, width=64, seed=3)),
             ("cones", dict(steps=9, height=64, width=128, seed=5, cache=CacheConfig(policy="dbcache", warmup=1)))]
    alone = [run(m, tokenizer, [s])[0][0] for s in specs]
    assert run(m, tokenizer, specs)[0] == alone


def test_the_calibration_tool_sweeps_knobs_and_reports_image_metrics(capsys):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "calibrate_cache.py")
    spec = importlib.util.spec_from_file_location("calibrate_cache", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--policy", "fixed", "--sweep", "interval=2,3", "--size", "32", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "uncached" in out and "fixed (interval=2)" in out and "PSNR dB" in out
    assert mod.image_metrics(*(np.zeros((8, 8, 3), np.uint8),) * 2) == (float("inf"), 1.0)
    with pytest.raises(ValueError, match="KNOB=v1,v2"):
        mod.sweep_configs("fixed", ["bogus=1"], None)


def test_the_fixture_modes_report_measures_each_inexact_mode_against_exact(capsys):
    from scripts.fixture_modes_report import main

    assert main(["--steps", "10"]) == 0
    out = capsys.readouterr().out
    for mode in ("fixed", "dbcache", "taylorseer", "fp8"):
        assert f"{mode} text2img" in out and f"{mode} img2img" in out
