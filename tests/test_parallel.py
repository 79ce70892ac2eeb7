"""Sequence and CFG parallelism on CPU/gloo: every exact configuration reproduces the single-device md5."""
import csv
import json
import os
import subprocess
import sys

import pytest

from parallel.mesh import ParallelConfig
from parallel.sweep import configs_for
from bagel_model.engine.token_split import TokenSplit
from parallel.ulysses import head_split, kv_heads_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_sweep(world: int, tmp_path, *extra: str) -> dict:
    out = tmp_path / f"sweep{world}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port",
           str(29600 + world), "-m", "parallel.sweep", "--steps", "4", "--json", str(out), *extra]  # later --steps wins
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("world,size", [(2, ["48", "80"]), (4, ["48", "80"]), (3, ["64", "64"])])
def test_every_exact_config_matches_single_device(world, size, tmp_path):
    res = run_sweep(world, tmp_path, "--size", *size)
    rows = {r["config"]: r for r in res["rows"]}
    base = rows["single"]["md5"]
    exact = [r for r in res["rows"] if r["mode"] == "exact" and r["config"] != "single"]
    expected = {pc.name() for pc in configs_for(world, 6)}
    assert expected <= set(rows), f"missing configs: {expected - set(rows)}"
    assert exact and all(r["md5"] == base for r in exact), [(r["config"], r["md5"]) for r in exact]
    # the packed step reproduces the per-branch oracle, and batched requests each give their solo md5
    assert rows["single-per-branch"]["md5"] == base
    # the sweep's text-to-image is the pipeline's: the same request (prompt, size, steps, seed, every default) gives
    # the md5 pipe(...) gives
    if world == 2:
        from bagel_model.pipeline import BagelPipeline

        pipe = BagelPipeline.from_preset("tiny")
        pipe.set_progress_bar_config(disable=True)
        out = pipe("a red cube", height=int(size[0]), width=int(size[1]), num_inference_steps=4, seed=0)
        assert out.latent_md5s[0] == base
    batches = [r for r in res["rows"] if r["config"].startswith("batch")]
    assert batches and all(r["match"] and len(set(r["md5s"])) == 3 for r in batches), batches
    for r in res["rows"]:
        if r["mode"] == "fast":
            assert r["max_abs_err"] < 1e-4  # fast ring: tolerance, not bits
    # CFG-parallel: one all_gather per CFG step and zero broadcasts inside the loop
    cfg_only = [r for r in res["rows"] if r["config"].startswith("cfg")]
    for r in cfg_only:
        assert r["collectives"]["broadcast"] == 0
        assert r["collectives"]["all_gather"] > 0
    if world == 4 and size == ["48", "80"]:  # README's run (scripts/readme_output.py): its rows are these rows
        import importlib.util

        spec = importlib.util.spec_from_file_location("readme_output", os.path.join(ROOT, "scripts", "readme_output.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        documented = mod.rows(mod.block(open(os.path.join(ROOT, "README.md")).read()))
        assert {c: d for c, (d, _, _) in documented.items()} == {r["config"]: r["degrees"] for r in res["rows"]}, \
            "README's sweep output is out of date: run python scripts/readme_output.py"


@pytest.mark.slow
@pytest.mark.parametrize("world,cache", [
    (2, ["--cache", "fixed", "--cache-warmup", "1"]),
    (3, ["--cache", "taylorseer", "--cache-warmup", "1", "--cache-interval", "2"]),
    (4, ["--cache", "dbcache", "--cache-warmup", "1", "--cache-threshold", "0.5", "--cache-taylor-order", "2"]),
], ids=["fixed-w2", "taylorseer-w3", "dbcache-w4"])
def test_with_step_caching_every_exact_config_matches_single_device(world, cache, tmp_path):
    """A cached request is its own exactness class: every exact configuration, and every batch mixing policies
    (the sweep gives its second request no cache and its third the other policy), gives one device's bits."""
    res = run_sweep(world, tmp_path, "--steps", "8", *cache)
    rows = {r["config"]: r for r in res["rows"]}
    base = rows["single"]["md5"]
    exact = [r for r in res["rows"] if r["mode"] == "exact" and r["config"] != "single"]
    assert {pc.name() for pc in configs_for(world, 6)} <= set(rows)
    assert exact and all(r["md5"] == base and r["match"] for r in exact), [(r["config"], r["md5"]) for r in exact]
    assert any(r["config"].startswith("batch") for r in exact)


def test_head_split_any_degree():
    assert head_split(28, 8) == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 19), (19, 22), (22, 25), (25, 28)]
    assert head_split(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert [kv_heads_for(r, 7) for r in head_split(28, 8)][:3] == [(0, 1), (0, 2), (1, 2)]  # KV heads replicated
    with pytest.raises(ValueError, match="exceeds 6 query heads"):
        head_split(6, 7)


def test_token_split_pads_only_the_global_tail():
    s = TokenSplit(4098, 4, 128)
    assert s.chunk == 1152 and s.padded == 4608
    assert [s.valid(r) for r in range(4)] == [1152, 1152, 1152, 642]
    assert TokenSplit(17, 4, 16).valid(3) == 0  # a rank may hold only padding
    with pytest.raises(ValueError):
        TokenSplit(0, 2)


@pytest.mark.parametrize("pc,world,msg", [
    (ParallelConfig(ulysses=2, ring=2), 2, "= 4 ranks, but the world has only 2"),
    (ParallelConfig(cfg=4), 4, "exceeds the 3 CFG branches"),
    (ParallelConfig(ulysses=8), 8, "exceeds the model's 6 query heads"),
    (ParallelConfig(ring=2, ring_mode="slow"), 2, "ring_mode"),
])
def test_bad_degrees_are_named(pc, world, msg):
    with pytest.raises(ValueError, match=msg):
        pc.validate(world, num_heads=6)


def test_cfg_job_assignment():
    from parallel.denoise import assign_jobs

    assert assign_jobs(3, 3) == [[0], [1], [2]]
    assert assign_jobs(3, 2) == [[0, 2], [1]]
    assert assign_jobs(2, 3) == [[0], [1], []]  # deduplicated text-to-image CFG: 2 jobs, a third rank idles
    assert assign_jobs(1, 3) == [[0]] * 3  # outside the CFG interval every rank computes the one job


def _single_job_steps(rank, world, store_path, config, q):
    import torch
    import torch.distributed as dist

    from bagel_kernels import token_alignment
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.sampling import SamplingParams
    from bagel_model.engine.denoise import DenoiseRequest, denoise
    from bagel_model.engine.step import PackedStep
    from bagel_model.engine.output import tensor_md5
    from helpers import t2i_contexts
    from bagel_model.core.model import BagelModel
    from bagel_model.core.tokenizer import BagelTokenizer
    from parallel.denoise import ParallelStep
    from parallel.mesh import Mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    cfg = BagelConfig.preset("tiny")
    model, tok = BagelModel.random(cfg, seed=0), BagelTokenizer.from_directory(None)
    model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    ctx = t2i_contexts(model, tok, "a red cube")
    # 6 steps, CFG only above t = 0.6: the last steps have one job each
    params = SamplingParams(steps=6, seed=3, height=48, width=80, cfg_interval=(0.6, 1.0))
    align = token_alignment(torch.device("cpu"), model.kernels)
    mesh = Mesh.build(config, cfg.num_heads)
    with torch.no_grad():
        want = tensor_md5(denoise([DenoiseRequest.start(cfg, params, ctx, "cpu")], PackedStep(model, align),
                                  progress=False)[0])
        got, solo = None, 0
        if mesh.active:
            eng = ParallelStep(model, mesh, align)
            got = tensor_md5(denoise([DenoiseRequest.start(cfg, params, ctx, "cpu")], eng, progress=False)[0])
            solo = eng._solo.forwards if eng._solo is not None else 0
    q.put((rank, mesh.active, got == want, solo, mesh.solo.config.name() if mesh.solo else None))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world,config,solo_name", [
    (2, ParallelConfig(cfg=2), "ulysses2"),
    (3, ParallelConfig(cfg=3), "ulysses3"),
    (4, ParallelConfig(ring=2, cfg=2), "ring4-exact"),
])
def test_cfg_parallel_splits_single_job_steps_over_every_rank(world, config, solo_name, tmp_path):
    """Outside the CFG interval a text2img step has one job: under CFG-parallel the CFG ranks join its sequence
    split (``Mesh.solo``) instead of each computing all of it, and the request's latent stays one device's, bitwise."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_single_job_steps, args=(r, world, str(tmp_path / "store"), config, q))
             for r in range(world)]
    for p in procs:
        p.start()
    got = [q.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    for rank, active, same, solo, name in got:
        assert active and same and solo > 0 and name == solo_name, got


def _peer_dies(rank, store_path, q):
    import datetime

    import torch
    import torch.distributed as dist

    from parallel.mesh import CollectiveError, guarded

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=10))
    if rank == 1:
        os._exit(0)  # a rank fails without a word
    try:
        out = [torch.zeros(4) for _ in range(2)]
        guarded("sp all_gather velocity rows", dist.all_gather, out, torch.ones(4))
        q.put("no error")
    except CollectiveError as e:
        q.put(str(e))


def test_dead_peer_gives_an_error_naming_rank_and_collective(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_peer_dies, args=(r, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    msg = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    assert "rank 0" in msg and "sp all_gather velocity rows" in msg, msg


@pytest.mark.slow
def test_parallel_step_benchmark_runs_and_checks_every_config(tmp_path):
    """The per-step scaling benchmark (run on GPUs for RESULTS.md) works end to end on CPU/gloo, world 2."""
    out = tmp_path / "results.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29640",
           "-m", "benchmarks.bench_parallel_step", "--size", "64", "--iters", "1", "--warmup", "0", "--csv", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    configs = {r["subject"].split()[2] for r in rows}
    assert {pc.name() for pc in configs_for(2, 6)} | {"single"} == configs
    exact = [r for r in rows if "fast" not in r["subject"]]
    assert exact and all("velocities == single" in r["subject"] for r in exact)
    assert all(float(r["value"]) > 0 and r["metric"] == "s/step" for r in rows)
