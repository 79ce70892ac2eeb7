"""Denoise step and end to end: the packed, graph-replayed step vs a torch.compile'd plain PyTorch step doing the
same work (``peer_torch_step``), per-image seconds through ``BagelPipeline``, and a batch of requests.

    python -m benchmarks.bench_step --preset bagel-7b-mot --parts check,step,e2e,batch [--quantization fp8] --json $OUT/step.json

Rows: per step (ms, TFLOP/s, GPU busy, peer ms, ratio = peer ms / ours) for text2img (2 jobs: full + no-text, cfg_img
deduplicated) and img2img (3 jobs) at 1024² and 512²; per image (s, peak GiB) for text2img 1024²/512² and img2img
1024² at 50 timesteps; a batch of 4 text2img 512² requests vs the same requests one after another. ``check``: graph
replay == eager bit for bit under ``torch.cuda.set_sync_debug_mode("error")``. Every ``ratio`` (JSON and results
table) is the speedup of ours over the peer, > 1 = ours faster (``benchmarks.common.speedup``): the step's is peer
ms / ours, the batch's one-after-another s / batch s. ``--quantization fp8`` adds the FP8 model's packed step (same
weights, quantized; same contexts) with the bf16 exact step of the run as its peer.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from datetime import date

import torch

from benchmarks.common import add_output_args, emit, kernel_breakdown, row
from benchmarks.peer_torch_step import TorchStep


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="bagel-7b-mot", help="model preset (random bf16 weights on CUDA)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: all)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 512], help="image sides in pixels")
    p.add_argument("--steps", type=int, default=50, help="timesteps per image (end to end)")
    p.add_argument("--iters", type=int, default=10, help="timed step replays")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt context length of a step")
    p.add_argument("--vit-tokens", type=int, default=4902, help="ViT block length of an img2img context (1024²)")
    p.add_argument("--parts", default="check,step,e2e,batch", help="comma list of: check, step, profile, e2e, batch, reuse")
    p.add_argument("--no-peer", action="store_true", help="skip the torch.compile peer")
    p.add_argument("--quantization", choices=["none", "fp8"], default="none",
                   help="fp8: also time the step of an FP8 model (same weights, quantized) on the same contexts, "
                        "against the bf16 step of this run")
    p.add_argument("--json", default=None, help="also write every measurement, with its details, as JSON here")
    return add_output_args(p)


def linear_flops_per_row(cfg) -> int:
    h, i, d = cfg.hidden_size, cfg.llm.intermediate_size, cfg.head_dim
    return 2 * h * (cfg.num_heads * d + 2 * cfg.num_kv_heads * d) + 2 * h * h + 4 * h * i + 2 * i * h


def step_flops(cfg, n_rows: list[int], ctx_lens: list[int]) -> float:
    attn = sum(4 * q * (c + q) * cfg.num_heads * cfg.head_dim for q, c in zip(n_rows, ctx_lens))
    return cfg.num_layers * (sum(n_rows) * linear_flops_per_row(cfg) + attn)


def random_context(model, n: int, seed: int):
    """A context of ``n`` random K/V tokens (a paged cache, as the prefill makes it) at RoPE position ``n``."""
    from bagel_model.engine.kv_cache import Context, empty_context, new_cache

    if n == 0:
        return empty_context(model)
    g = torch.Generator(device=model.device).manual_seed(seed)
    shape = (n, model.cfg.num_kv_heads, model.cfg.head_dim)
    cache = new_cache(model, n)
    for layer in range(model.cfg.num_layers):
        k = torch.randn(shape, generator=g, device=model.device).to(model.dtype)
        v = torch.randn(shape, generator=g, device=model.device).to(model.dtype)
        cache.write(layer, k, v)
    cache.commit(n)
    return Context(cache, n)


def timed(fn, iters: int) -> tuple[float, float]:
    """(GPU ms per call by events, wall ms per call) over ``iters`` calls after one untimed call."""
    fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    w0 = time.perf_counter()
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters, (time.perf_counter() - w0) * 1e3 / iters


def gpu_busy(fn, iters: int = 3) -> float:
    """Time some kernel runs / wall time over ``iters`` calls (profiler): how much of the step the GPU computes."""
    got = kernel_breakdown(fn, iters)
    return got["busy"] / got["wall"]


def bench_step(model, args, rows: list, fp8_model=None) -> None:
    from bagel_model.engine.step import GenJob, PackedStep

    cfg = model.cfg
    for side in args.sizes:
        grid = cfg.check_image_size(side, side)
        n = grid[0] * grid[1]
        vae = n + 2
        vit = args.vit_tokens if side >= 1024 else (args.vit_tokens // 4 + 1)
        cases = {"text2img": [args.text_tokens, 0],
                 "img2img": [vae + vit + args.text_tokens, vae + vit, args.text_tokens]}
        for mode, lens in cases.items():
            ctxs = [random_context(model, L, i) for i, L in enumerate(lens)]
            jobs = [GenJob(grid, c) for c in ctxs]
            xs = [torch.randn(n, cfg.patch_latent_dim, device=model.device) for _ in jobs]
            ts = [0.7] * len(jobs)
            eng = PackedStep(model)
            eng(jobs, xs, ts)  # eager: compiles
            ms, wall = timed(lambda: eng(jobs, xs, ts), args.iters)
            busy = gpu_busy(lambda: eng(jobs, xs, ts))
            fl = step_flops(cfg, [n + 2] * len(jobs), lens)
            row = dict(subject="denoise_step", mode=mode, size=side, jobs=len(jobs), ctx=lens, ms=round(ms, 3),
                       wall_ms=round(wall, 3), tflops=round(fl / ms / 1e9, 1), gpu_busy=round(busy, 3))
            del eng
            if fp8_model is not None:  # the FP8 model's step on the same contexts (its KV cache is bf16 too)
                eng8 = PackedStep(fp8_model)
                eng8(jobs, xs, ts)
                ms8, _ = timed(lambda: eng8(jobs, xs, ts), args.iters)
                row.update(fp8_ms=round(ms8, 3), fp8_gpu_busy=round(gpu_busy(lambda: eng8(jobs, xs, ts)), 3))
                del eng8
            if not args.no_peer:
                peer = TorchStep(model, [[ctx.cache.read(i) for i in range(cfg.num_layers)] if ctx.length else None
                                         for ctx in ctxs],
                                 [c.rope_position for c in ctxs])
                h_lat = torch.randn(len(jobs), n, cfg.hidden_size, device=model.device, dtype=model.dtype)
                h_mk = torch.randn(len(jobs), 2, cfg.hidden_size, device=model.device, dtype=model.dtype)
                t0 = time.time()
                for _ in range(2):
                    peer(h_lat, h_mk)
                torch.cuda.synchronize()
                compile_s = time.time() - t0
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    peer(h_lat, h_mk)
                pms, pwall = timed(g.replay, args.iters)
                row.update(peer_ms=round(pms, 3), peer_compile_s=round(compile_s, 1), ratio=round(pms / ms, 3))
                del peer, g
            print(row, flush=True)
            rows.append(row)
            del ctxs, jobs
            torch.cuda.empty_cache()


def profile_step(model, args, rows: list, quantization: str = "none") -> None:
    """Where a text2img 1024² CFG step's GPU time goes: kernels by total time (profiler, 3 replays); with
    ``--quantization fp8`` the FP8 model's step (where its quantizers and GEMMs spend it)."""
    from torch.profiler import ProfilerActivity, profile

    from bagel_model.engine.step import GenJob, PackedStep

    side = max(args.sizes)
    grid = model.cfg.check_image_size(side, side)
    n = grid[0] * grid[1]
    ctxs = [random_context(model, args.text_tokens, 0), random_context(model, 0, 1)]
    jobs = [GenJob(grid, c) for c in ctxs]
    xs = [torch.randn(n, model.cfg.patch_latent_dim, device=model.device) for _ in jobs]
    eng = PackedStep(model)
    for _ in range(3):
        eng(jobs, xs, [0.7, 0.7])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            eng(jobs, xs, [0.7, 0.7])
        torch.cuda.synchronize()
    table = sorted(((e.key, e.device_time_total / 3e3, e.count // 3) for e in prof.key_averages()
                    if e.device_time_total), key=lambda r: -r[1])[:20]
    print(f"profile of the {quantization} step:", flush=True)
    for k, ms, c in table:
        print(f"{ms:9.2f} ms  x{c:<5d} {k[:110]}", flush=True)
    rows.append(dict(subject="profile", mode="text2img", size=side, quantization=quantization,
                     kernels=[[k[:110], round(ms, 3), c] for k, ms, c in table]))


def bench_e2e(model, tok, args, rows: list) -> None:
    from bagel_model.core.sampling import SamplingParams
    from bagel_model.pipeline import BagelPipeline
    from bagel_model.serving.stages import EventLog, Request, run_stage0, run_stage1_batch

    pipe = BagelPipeline(model, tok)
    img = (torch.arange(1024 * 1024 * 3) % 251).to(torch.uint8).reshape(1024, 1024, 3)
    cases = [("text2img", s) for s in args.sizes] + [("img2img", 1024)]
    for mode, side in cases:
        def req(steps):
            extra = dict(cfg_img_scale=2.0, cfg_interval=(0.0, 1.0), cfg_renorm_type="text_channel") \
                if mode == "img2img" else {}
            p = SamplingParams(steps=steps, seed=0, height=side, width=side, **extra)
            return Request(mode=mode, prompt="a photo of a red cube on a wooden table", params=p,
                           image=img[:side, :side] if mode == "img2img" else None)

        for phase, steps in (("cold", 3), ("warm", args.steps)):
            ev = EventLog()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            r = req(steps)
            r0 = run_stage0(model, tok, r, events=ev)
            (r1,) = run_stage1_batch(model, [r0.diffusion], events=ev)
            torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            evs = dict(ev.events)
            marks = {k: round(v - evs["stage0_start"], 3) for k, v in evs.items()}
            row = dict(subject="end_to_end", mode=mode, size=side, steps=steps, phase=phase, seconds=round(secs, 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), events=marks,
                       latent_md5=r1.latent_md5)
            print(row, flush=True)
            rows.append(row)
    del pipe


def bench_batch(model, tok, args, rows: list) -> None:
    from bagel_model.core.sampling import SamplingParams
    from bagel_model.pipeline import BagelPipeline
    from bagel_model.serving.stages import Request

    pipe = BagelPipeline(model, tok)
    side = min(args.sizes)
    prompts = ["a red cube", "a blue ball on grass", "two green cones", "a yellow house at night"]
    reqs = [Request(mode="text2img", prompt=pr, params=SamplingParams(steps=args.steps, seed=i, height=side, width=side),
                    request_id=f"r{i}") for i, pr in enumerate(prompts)]
    pipe.generate_batch(reqs[:2])  # warm: kernels of the batched shapes
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    solo = [pipe.generate(r)[1].latent_md5 for r in reqs]
    torch.cuda.synchronize()
    t_solo = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = pipe.generate_batch(reqs)
    torch.cuda.synchronize()
    t_batch = time.perf_counter() - t0
    row = dict(subject="batch", mode="text2img", size=side, requests=len(reqs), steps=args.steps,
               sequential_s=round(t_solo, 3), batch_s=round(t_batch, 3), ratio=round(t_solo / t_batch, 3),
               md5_equal=[r1.latent_md5 for _, r1 in out] == solo)
    print(row, flush=True)
    rows.append(row)


def bench_reuse(model, tok, args, rows: list) -> None:
    """A request through a pipeline whose step engine has run a request of the same shapes before (another prompt of
    the same length: its layouts replay their CUDA graphs from the first step) against the same request through a
    fresh engine (first step of each layout eager, the second one recorded); both latents must be equal."""
    from bagel_model.core.sampling import SamplingParams
    from bagel_model.engine.step import PackedStep
    from bagel_model.pipeline import BagelPipeline
    from bagel_model.serving.stages import Request

    pipe = BagelPipeline(model, tok)
    prompts = ("a photo of a red cube on a wooden table", "a photo of a tan cube on a wooden table")
    assert len(tok.encode_prompt(prompts[0])) == len(tok.encode_prompt(prompts[1]))
    for side in args.sizes:
        def req(prompt, rid):
            p = SamplingParams(steps=args.steps, seed=0, height=side, width=side)
            return Request(mode="text2img", prompt=prompt, params=p, request_id=rid)

        pipe.generate(req(prompts[0], "a"))  # the long-lived engine records this size's layouts
        timed = {}
        for name, engine in (("long-lived engine", None), ("fresh engine", PackedStep(model))):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            _, r1 = pipe.generate(req(prompts[1], "b"), engine=engine)
            torch.cuda.synchronize()
            timed[name] = (time.perf_counter() - t0, r1.latent_md5)
        row = dict(subject="reuse", mode="text2img", size=side, steps=args.steps,
                   reused_s=round(timed["long-lived engine"][0], 3), fresh_s=round(timed["fresh engine"][0], 3),
                   md5_equal=timed["long-lived engine"][1] == timed["fresh engine"][1],
                   refills=pipe.step_engine().refills)
        print(row, flush=True)
        rows.append(row)
    del pipe


def check_graph(model, tok, rows: list) -> None:
    """Graph replay == eager, bit for bit, and no host synchronization inside the replayed loop."""
    from bagel_model.core.sampling import SamplingParams
    from bagel_model.engine.denoise import denoise, timestep_schedule
    from bagel_model.engine.finite_guard import FiniteGuard
    from bagel_model.engine.output import tensor_md5
    from bagel_model.engine.step import PackedStep
    from bagel_model.oracle import PerBranchStep
    from bagel_model.runtime.sync_guard import forbid_host_sync
    from bagel_model.serving.stages import Request, prepare_image

    def reqs():
        out = []
        for i, (pr, side) in enumerate((("a red cube", 512), ("a blue ball", 256))):
            p = SamplingParams(steps=6, seed=i, height=side, width=side)
            r = prepare_image(model, tok, Request("text2img", pr, p)).start(model)
            r.schedule = timestep_schedule(p.steps, p.timestep_shift)
            out.append(r)
        return out

    eager = [tensor_md5(x) for x in denoise(reqs(), PackedStep(model, use_graph=False), progress=False)]
    # the per-branch oracle (one forward per CFG branch, the unpacked layout) must give the same bits
    per_branch = [tensor_md5(denoise([r], PerBranchStep(model), progress=False)[0]) for r in reqs()]
    rows.append(dict(subject="check", what="packed step == per-branch loop (2 requests, 6 steps)",
                     equal=per_branch == eager, md5s=per_branch))
    print(rows[-1], flush=True)
    eng = PackedStep(model, use_graph=True)
    rs = reqs()
    guards = [FiniteGuard() for _ in rs]
    with forbid_host_sync(cuda=True):
        xs = denoise(rs, eng, progress=False, guards=guards)
    for g in guards:
        g.check()
    graphed = [tensor_md5(x) for x in xs]
    row = dict(subject="check", what="graph replay == eager (2 requests, 6 steps, sync debug error)",
               equal=graphed == eager, md5s=graphed, graphs=sum(e.graph is not None for e in eng._entries.values()))
    print(row, flush=True)
    rows.append(row)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_step needs a CUDA GPU (see --help)")
    import triton

    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel
    from bagel_model.core.tokenizer import BagelTokenizer

    cfg = BagelConfig.preset(args.preset)
    if args.layers:
        cfg.llm.num_hidden_layers = args.layers
    t0 = time.time()
    model = BagelModel.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    tok = BagelTokenizer.from_directory(None)
    model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    fp8_model = None
    if args.quantization == "fp8":
        from bagel_kernels import KernelOptions

        fp8_model = BagelModel.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda",
                                      kernels=KernelOptions(quantization="fp8"))
        fp8_model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    print(f"model ready in {time.time() - t0:.1f} s", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                commit=commit, date=date.today().isoformat(), preset=args.preset, layers=cfg.num_layers)
    rows: list = []
    parts = args.parts.split(",")
    try:
        if "check" in parts:
            check_graph(model, tok, rows)
        if "step" in parts:
            bench_step(model, args, rows, fp8_model)
        if "profile" in parts:
            profile_step(model if fp8_model is None else fp8_model, args, rows,
                         "none" if fp8_model is None else "fp8")
        if "e2e" in parts:
            bench_e2e(model, tok, args, rows)
        if "batch" in parts:
            bench_batch(model, tok, args, rows)
        if "reuse" in parts:
            bench_reuse(model, tok, args, rows)
    finally:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, rows=rows), f, indent=1)
        emit(table_rows(rows, args), args)
    return 0


def table_rows(rows: list[dict], args) -> list[dict]:
    """The results-table rows (benchmarks/results.csv) of this run's measurements."""
    out = []
    for r in rows:
        if r["subject"] == "denoise_step":
            shape = f"{args.preset} {r['size']}² {r['mode']} CFG step, {r['jobs']} packed jobs, ctx {r['ctx']}"
            out.append(row("denoise step (packed, graph replay)", shape, "ms", r["ms"], "torch.compile plain step"
                           if "peer_ms" in r else "", r.get("peer_ms")))
            out.append(row("denoise step (packed, graph replay)", shape, "TFLOP/s", r["tflops"]))
            out.append(row("denoise step (packed, graph replay)", shape, "GPU busy", r["gpu_busy"]))
            if "fp8_ms" in r:
                out.append(row("denoise step fp8 (packed, graph replay)", shape, "ms", r["fp8_ms"],
                               "bf16 exact packed step", r["ms"]))
                out.append(row("denoise step fp8 (packed, graph replay)", shape, "GPU busy", r["fp8_gpu_busy"]))
        elif r["subject"] == "end_to_end" and r["phase"] == "warm":
            shape = f"{args.preset} {r['size']}² {r['mode']}, {r['steps']} timesteps"
            out.append(row("end to end (BagelPipeline stages)", shape, "s/image", r["seconds"]))
            out.append(row("end to end (BagelPipeline stages)", shape, "peak GiB", r["peak_gib"]))
        elif r["subject"] == "reuse":
            shape = f"{args.preset} {r['size']}² text2img, {r['steps']} timesteps, after a request of the same shapes"
            out.append(row(f"end to end, long-lived step engine ({'same latent' if r['md5_equal'] else 'LATENT DIFFERS'})",
                           shape, "s/image", r["reused_s"], "fresh engine", r["fresh_s"]))
        elif r["subject"] == "batch":
            shape = f"{args.preset} {r['size']}² {r['mode']}, {r['requests']} requests, {r['steps']} timesteps"
            out.append(row("batch of requests (generate_batch)", shape, "s", r["batch_s"], "one after another",
                           r["sequential_s"]))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
