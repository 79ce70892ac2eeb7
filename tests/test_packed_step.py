"""The packed denoise step: every CFG job of every request in one forward, bit for bit the per-branch loop."""
import pytest
import torch

from bagel_kernels import KernelOptions
from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.denoise import denoise
from bagel_model.engine.finite_guard import FiniteGuard
from bagel_model.engine.layout import PackedLayout
from bagel_model.engine.output import tensor_md5
from bagel_model.engine.step import GenJob, PackedStep
from bagel_model.oracle import PerBranchStep
from bagel_model.pipeline import BagelPipeline
from bagel_model.runtime.sync_guard import forbid_host_sync
from bagel_model.serving.stages import Request
from helpers import per_branch, t2i_contexts, t2i_request as request


def params(**kw):
    p = dict(steps=4, seed=0, height=48, width=80, cfg_text_scale=4.0, cfg_img_scale=1.5, cfg_interval=(0.4, 1.0))
    p.update(kw)
    return SamplingParams(**p)


def test_layout_puts_all_latents_first_and_groups_the_markers():
    lay = PackedLayout(((2, 3), (1, 2)), degree=2, align=2)
    assert lay.latent_offset == (0, 6) and lay.latent_rows == 8
    assert lay.marker_rows(0) == (8, 9) and lay.marker_rows(1) == (10, 11)
    assert lay.split.n == 12 and lay.split.padded == 12
    # two expert segments however many jobs: generation latents, then understanding markers (+ tail padding)
    assert lay.routing(0).segments == ((0, 6, True),)
    assert lay.routing(1).segments == ((0, 2, True), (2, 6, False))
    # each job's rows in its own canonical order: <vision_start>, latents, <vision_end>
    rows = lay.rows_by_job(0, 12, "cpu")
    assert rows.index.tolist() == [8, 0, 1, 2, 3, 4, 5, 9, 10, 6, 7, 11]
    assert rows.cu.tolist() == [0, 8, 12] and rows.max_len == 8
    # a rank's share, relative to its first row
    mine = lay.rows_by_job(6, 12, "cpu")
    assert mine.index.tolist() == [2, 3, 4, 0, 1, 5] and mine.cu.tolist() == [0, 2, 6]


@pytest.mark.parametrize("size", [(48, 80), (16, 16), (80, 48)])  # odd grids: 3x5, 1x1, 5x3
def test_text_to_image_packed_equals_per_branch(tiny_model, tokenizer, size):
    p = params(height=size[0], width=size[1])
    want = per_branch(tiny_model, tokenizer, "a red cube", p)
    (got,) = denoise([request(tiny_model, tokenizer, "a red cube", p)], PackedStep(tiny_model), progress=False)
    assert tensor_md5(got) == tensor_md5(want)


def test_text_to_image_cfg_step_runs_two_jobs_in_one_forward(tiny_model, tokenizer):
    """cfg_img's context IS the full context (same x_t, same t): its velocity is computed once and reused."""
    p = params(steps=3, cfg_interval=(0.0, 1.0))  # every step is a CFG step
    eng = PackedStep(tiny_model)
    denoise([request(tiny_model, tokenizer, "a red cube", p)], eng, progress=False)
    assert eng.forwards == 2 and eng.jobs_run == 4  # 2 steps, 2 jobs (full, no-text) each, 1 forward each


def test_image_editing_packs_three_distinct_branches(tiny_model, tokenizer):
    """img2img through the stages: three distinct contexts (paged) -> three jobs, same md5 as the per-branch loop."""
    from bagel_model.serving.stages import run_stage0

    img = (torch.arange(48 * 64 * 3) % 251).to(torch.uint8).reshape(48, 64, 3)
    req = Request(mode="img2img", prompt="make it blue", image=img,
                  params=params(height=48, width=64, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                                cfg_renorm_type="text_channel"))
    inp = run_stage0(tiny_model, tokenizer, req).diffusion  # the input image after upstream's resize rule
    assert len({id(c) for c in inp.contexts.values()}) == 3
    want = denoise([inp.start(tiny_model)], PerBranchStep(tiny_model), progress=False)[0]
    eng = PackedStep(tiny_model)
    (got,) = denoise([inp.start(tiny_model)], eng, progress=False)
    assert tensor_md5(got) == tensor_md5(want)
    assert eng.jobs_run == 3 * eng.forwards
    _, res = BagelPipeline(tiny_model, tokenizer).generate(req)
    assert res.latent_md5 == tensor_md5(want)


def test_a_batch_of_mixed_requests_equals_each_request_alone(tiny_model, tokenizer):
    reqs = [("a red cube", params()),
            ("a blue ball", params(height=32, width=16, steps=3, seed=5, cfg_img_scale=1.0)),
            ("two green cones", params(height=16, width=48, steps=6, seed=7, cfg_interval=(0.0, 1.0),
                                       cfg_renorm_type="channel")),
            ("no guidance", params(steps=5, seed=9, cfg_text_scale=1.0))]
    alone = [tensor_md5(per_branch(tiny_model, tokenizer, pr, p)) for pr, p in reqs]
    eng = PackedStep(tiny_model)
    got = denoise([request(tiny_model, tokenizer, pr, p) for pr, p in reqs], eng, progress=False)
    assert [tensor_md5(x) for x in got] == alone
    assert eng.forwards == 5  # one packed forward per step, for as long as the longest request runs


def test_pipeline_batch_returns_one_result_per_request(tiny_model, tokenizer):
    pipe = BagelPipeline(tiny_model, tokenizer)
    reqs = [Request(mode="text2img", prompt="a red cube", params=params(), request_id="a"),
            Request(mode="text2text", prompt="hello", params=params(), max_tokens=3, request_id="b"),
            Request(mode="text2img", prompt="a blue ball", params=params(height=16, width=32, steps=3, seed=2),
                    request_id="c")]
    out = pipe.generate_batch(reqs)
    assert [r1 is None for _, r1 in out] == [False, True, False]
    for req, (_, r1) in zip(reqs, out):
        if r1 is not None:
            assert r1.latent_md5 == pipe.generate(req)[1].latent_md5
    with pytest.raises(ValueError, match="unique"):
        pipe.generate_batch([reqs[0], reqs[0]])


def test_packed_step_does_not_read_the_device(tiny_model, tokenizer):
    from bagel_model.engine.denoise import timestep_schedule

    r = request(tiny_model, tokenizer, "a red cube", params())
    r.schedule = timestep_schedule(r.params.steps, r.params.timestep_shift)  # host floats, made before the region
    eng = PackedStep(tiny_model)
    guard = FiniteGuard()
    with forbid_host_sync(cuda=False):
        denoise([r], eng, progress=False, guards=[guard])
    guard.check()  # the one host read, after the loop


def test_jobs_and_latents_must_agree(tiny_model, tokenizer):
    ctx = t2i_contexts(tiny_model, tokenizer, "x")
    with pytest.raises(ValueError, match="latent of 4 tokens for a 3x5 grid"):
        PackedStep(tiny_model)([GenJob((3, 5), ctx["full"])], [torch.zeros(4, 64)], [1.0])


def test_packed_step_on_the_triton_kernels_equals_per_branch(tiny_model, tokenizer, monkeypatch):
    """The same check through the Triton kernels (CPU interpreter): varlen attention with per-job key order."""
    monkeypatch.setattr(tiny_model, "kernels", KernelOptions(backend="triton"))
    p = params(steps=2, height=16, width=32, cfg_interval=(0.0, 1.0))
    want = per_branch(tiny_model, tokenizer, "a red cube", p)
    (got,) = denoise([request(tiny_model, tokenizer, "a red cube", p)], PackedStep(tiny_model), progress=False)
    assert tensor_md5(got) == tensor_md5(want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_equals_eager_on_the_gpu(tokenizer):
    from bagel_model.core.config import BagelConfig
    from bagel_model.engine.denoise import timestep_schedule
    from bagel_model.core.model import BagelModel

    m = BagelModel.random(BagelConfig.preset("tiny"), seed=0, dtype=torch.bfloat16, device="cuda")
    m.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])
    p = params(steps=6, height=64, width=64)
    reqs = lambda: [request(m, tokenizer, "a red cube", p), request(m, tokenizer, "blue", params(seed=3))]  # noqa: E731
    for r in (rs := reqs()):
        r.x = r.x.cuda()
    eager = denoise(rs, PackedStep(m, use_graph=False), progress=False)
    for r in (rs := reqs()):
        r.x = r.x.cuda()
        r.schedule = timestep_schedule(r.params.steps, r.params.timestep_shift)  # host floats, before the region
    eng = PackedStep(m, use_graph=True)
    guards = [FiniteGuard() for _ in rs]
    with forbid_host_sync(cuda=True):
        graphed = denoise(rs, eng, progress=False, guards=guards)
    for g in guards:
        g.check()
    assert [tensor_md5(x) for x in graphed] == [tensor_md5(x) for x in eager]
    want = denoise([request(m, tokenizer, "a red cube", p)], PerBranchStep(m, 128), progress=False)[0]
    assert tensor_md5(want) == tensor_md5(eager[0])  # the GPU kernels give the per-branch oracle's bits too
    assert any(e.graph is not None for e in eng._entries.values())


def test_a_later_request_of_the_same_shapes_reuses_the_layout_bit_for_bit(tiny_model, tokenizer):
    """A long-lived engine keys its layouts by shapes (grids, context lengths, RoPE positions): a second prompt of
    the same length reuses the first one's entries -- on CUDA its CUDA graphs -- with its contexts copied into the
    entry's buffers, and gives what a fresh engine gives; so does the first prompt again afterwards."""
    a, b = "a red cube", "a tan cube"
    assert len(tokenizer.encode_prompt(a)) == len(tokenizer.encode_prompt(b))
    p = params()
    fresh = {s: tensor_md5(denoise([request(tiny_model, tokenizer, s, p)], PackedStep(tiny_model),
                                         progress=False)[0]) for s in (a, b)}
    assert fresh[a] != fresh[b]
    eng = PackedStep(tiny_model)
    got = [tensor_md5(denoise([request(tiny_model, tokenizer, s, p)], eng, progress=False)[0]) for s in (a, b, a)]
    assert got == [fresh[a], fresh[b], fresh[a]]
    assert eng.refills >= 2  # b took a's layouts over, then a took them back
    layouts = len(eng._entries)
    denoise([request(tiny_model, tokenizer, b, p)], eng, progress=False)
    assert len(eng._entries) == layouts  # no new layout for the same shapes


def test_a_long_lived_engine_keeps_only_its_latest_layouts(tiny_model, tokenizer):
    eng = PackedStep(tiny_model, max_layouts=1)
    for size in [(48, 80), (16, 16), (48, 80)]:
        p = params(height=size[0], width=size[1])
        want = per_branch(tiny_model, tokenizer, "a red cube", p)
        (got,) = denoise([request(tiny_model, tokenizer, "a red cube", p)], eng, progress=False)
        assert tensor_md5(got) == tensor_md5(want) and len(eng._entries) == 1
    with pytest.raises(ValueError, match="max_layouts"):
        PackedStep(tiny_model, max_layouts=0)


def test_the_pipeline_keeps_one_step_engine_across_calls(tiny_cfg, tokenizer):
    from bagel_model.core.model import BagelModel

    pipe = BagelPipeline(BagelModel.random(tiny_cfg, seed=0), tokenizer)
    pipe.set_progress_bar_config(disable=True)
    eng = pipe.step_engine()
    pipe.generate(Request(mode="text2img", prompt="a red cube", params=params(), request_id="one"))
    pipe.generate(Request(mode="text2img", prompt="a tan cube", params=params(), request_id="two"))
    assert pipe.step_engine() is eng and eng.forwards > 0 and eng.refills > 0
    pipe.to(torch.float32)  # placement changes drop it: its buffers belong to the old placement
    assert pipe.step_engine() is not eng
