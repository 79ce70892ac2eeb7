"""Per-denoise-step time of the packed, graph-replayed step: one device vs every parallel configuration the world
size allows; optionally one whole text-to-image request per configuration (``--e2e-steps``).

    torchrun --nproc-per-node 2 -m benchmarks.bench_parallel_step --config bagel-7b-mot --size 1024 2048
    (2048²: random weights with a grown latent position table; the released checkpoint stops at 1024 px)

A step = one text-to-image CFG step as the pipeline runs it: two jobs (``full`` and ``text``; ``img`` is the full
branch, deduplicated) in one packed forward (``bagel_model.engine.step.PackedStep`` on one device,
``parallel.denoise.ParallelStep`` on the mesh, both replayed from CUDA graphs on CUDA), with the SP all_gather of
velocity rows and the CFG exchange. Median of ``--iters`` steps after ``--warmup``, timed on the devices (CUDA events)
or the host clock (CPU/gloo), the maximum over ranks. Every rank checks its velocities against the single-device
ones (md5 for exact configurations); a row's speedup is the single device's step time over its own. NCCL on CUDA (one
GPU per rank), gloo on CPU. Rank 0 appends the rows to the results table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from bagel_kernels import token_alignment
from bagel_model.core.config import BagelConfig
from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.denoise import DenoiseRequest, denoise
from bagel_model.engine.step import GenJob, PackedStep
from bagel_model.engine.output import tensor_md5
from bagel_model.serving.stages import Request, prepare_image
from bagel_model.core.model import BagelModel
from bagel_model.core.tokenizer import BagelTokenizer
from parallel.context_kv import broadcast_contexts
from parallel.denoise import ParallelStep
from parallel.mesh import Mesh, init_distributed
from parallel.sweep import configs_for

from .common import add_output_args, emit, kernel_breakdown, row



def _timed(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_parallel_step", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", help="preset: tiny | bagel-7b-mot (seeded random weights)")
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    ap.add_argument("--size", type=int, nargs="+", default=[1024], help="square image sides to time")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated config names (default: all the world allows)")
    ap.add_argument("--e2e-steps", type=int, default=0,
                    help="also time one whole text-to-image request of this many timesteps per configuration "
                         "(denoise loop only: prefill and VAE decode are the same on every configuration)")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: also profile 3 steps of every configuration on every rank (kernel time by kind, GPU "
                         "busy vs wall, communication not overlapped with compute); rank 0's rows go to the table")
    return add_output_args(ap)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    rank, world = init_distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = BagelConfig.preset(args.config)
    if args.layers:
        cfg.llm.num_hidden_layers = args.layers
    # Random weights: grow the latent position table when a size beyond the released one (1024 px) is asked for,
    # so 2048² can be timed (a real checkpoint holds 64 x 64 positions).
    cfg.max_latent_size = max(cfg.max_latent_size, max(args.size) // cfg.latent_downsample)
    model, tok = BagelModel.random(cfg, seed=0, dtype=dtype, device=device), BagelTokenizer.from_directory(None)
    model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    cfg = model.cfg
    align = token_alignment(device, model.kernels)
    prompt = "a red cube on a wooden table"
    contexts = prepare_image(model, tok, Request("text2img", prompt, SamplingParams())).contexts
    shapes = {b: (contexts[b].length, contexts[b].rope_position) for b in ("full", "text")}
    wanted = set(args.only.split(",")) if args.only else None
    rows, base = [], {}
    profiling = args.profile and device.type == "cuda"

    def sync_time(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    def whole_request(engine, ctx, side) -> tuple[float, str]:
        p = SamplingParams(steps=args.e2e_steps, seed=0, height=side, width=side)
        req = DenoiseRequest.start(cfg, p, ctx, device)
        out = {}
        secs = sync_time(lambda: out.setdefault("x", denoise([req], engine, progress=False)[0]))
        return secs, tensor_md5(out["x"])

    with torch.no_grad():
        for side in args.size:
            grid = cfg.check_image_size(side, side)
            x = torch.randn(grid[0] * grid[1], cfg.patch_latent_dim, generator=torch.Generator().manual_seed(0)).to(device)
            jobs = [GenJob(grid, contexts["full"]), GenJob(grid, contexts["text"])]
            single = PackedStep(model, align)
            want = [tensor_md5(v) for v in single(jobs, [x, x], [0.5, 0.5])]
            base_s = _slowest(_timed(lambda: single(jobs, [x, x], [0.5, 0.5]), args.iters, args.warmup, device), device)
            base[side] = base_s
            r = dict(size=side, config="single", degrees="1", step_s=base_s, speedup=1.0, exact=True)
            if profiling:
                r["profile"] = kernel_breakdown(lambda: single(jobs, [x, x], [0.5, 0.5]))
            e2e_here = bool(args.e2e_steps) and side == args.size[0]  # whole requests at the first size only
            if e2e_here:
                whole_request(single, contexts, side)  # warm: every layout of the loop captured once
                r["e2e_s"], base_md5 = whole_request(single, contexts, side)
            rows.append(r)
            del single
            for pc in configs_for(world, cfg.num_heads):
                if wanted and pc.name() not in wanted:
                    continue
                mesh = Mesh.build(pc, cfg.num_heads)
                ctx = broadcast_contexts(contexts if rank == 0 else None, shapes, model)
                ctx["img"] = ctx["full"]
                r = dict(size=side, config=pc.name(), degrees=f"u{pc.ulysses} r{pc.ring} c{pc.cfg}",
                         mode=pc.ring_mode if pc.ring > 1 else "exact")
                if mesh.active:
                    eng = ParallelStep(model, mesh, align)
                    pj = [GenJob(grid, ctx["full"]), GenJob(grid, ctx["text"])]
                    got = eng(pj, [x, x], [0.5, 0.5])
                    same = [tensor_md5(v) for v in got] == want
                    secs = _timed(lambda: eng(pj, [x, x], [0.5, 0.5]), args.iters, args.warmup, device)
                    if profiling:
                        r["profile"] = kernel_breakdown(lambda: eng(pj, [x, x], [0.5, 0.5]))
                        print(f"[rank {rank}] {side}² {pc.name()}: {r['profile']}", flush=True)
                    if e2e_here:
                        whole_request(eng, ctx, side)
                        e2e, md5 = whole_request(eng, ctx, side)
                        same = same and (md5 == base_md5 or r["mode"] == "fast")
                        r["e2e_s"] = e2e
                    del eng
                else:  # an idle rank (CFG 3 on 4 ranks) reports zero
                    same, secs = True, 0.0
                    if e2e_here:
                        r["e2e_s"] = 0.0
                step_s = _slowest(secs, device)
                if e2e_here:
                    r["e2e_s"] = _slowest(r["e2e_s"], device)
                ok = torch.tensor([int(same)], device=device)
                dist.all_reduce(ok, op=dist.ReduceOp.MIN)
                r.update(step_s=step_s, speedup=base_s / step_s, exact=bool(ok.item()))
                rows.append(r)
    if rank == 0:
        print(f"\nparallel step benchmark: preset {cfg.name} ({cfg.num_layers} layers), world {world}, "
              f"device {device.type} {torch.cuda.get_device_name() if device.type == 'cuda' else ''}")
        print(f"{'size':<6}{'config':<28}{'degrees':<12}{'step s':>10}{'speedup':>9}{'request s':>11}  velocities")
        for r in rows:
            tag = "== single" if r["exact"] else ("differ (fast mode)" if r.get("mode") == "fast" else "DIFFER")
            e2e = f"{r['e2e_s']:>11.3f}" if "e2e_s" in r else f"{'':>11}"
            print(f"{r['size']:<6}{r['config']:<28}{r['degrees']:<12}{r['step_s']:>10.4f}{r['speedup']:>9.2f}{e2e}  {tag}")
        label = f"{cfg.name} ({cfg.num_layers} layers), world {world}"
        emit([row(f"parallel step {r['config']} ({'velocities == single' if r['exact'] else 'velocities differ'})",
                  f"{label}, {r['size']}², text2img CFG step (2 packed jobs)", "s/step", r["step_s"],
                  "" if r["config"] == "single" else "single device", None if r["config"] == "single" else base[r["size"]])
              for r in rows]
             + [row(f"text2img request {r['config']} (denoise loop, {args.e2e_steps} timesteps)",
                    f"{label}, {r['size']}²", "s/image", r["e2e_s"], "" if r["config"] == "single" else "single device",
                    None if r["config"] == "single" else rows[0]["e2e_s"])
                for r in rows if "e2e_s" in r and r["size"] == rows[0]["size"]]
             + [row(f"parallel step {r['config']} profile, rank 0", f"{label}, {r['size']}²", f"{kind} ms/step", ms)
                for r in rows if "profile" in r for kind, ms in r["profile"].items()], args)
    bad = [r for r in rows if not r["exact"] and r.get("mode") == "exact"]
    dist.barrier()
    dist.destroy_process_group()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
