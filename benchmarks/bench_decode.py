"""Stage 0's text decoding on the GPU: ms per greedy token, eager vs the CUDA-graph token step (and whether both
give the same tokens; the graph loop reads each token one step behind the GPU, and its one-step-at-a-time loop
is timed beside it), BAGEL-7B-MoT random bf16 after a 64-token prompt. ``--quantization fp8`` also times the model
with FP8 projection weights (its rows compare with bf16's from the same run: decoding reads every weight once per
token, so half the bytes is the expected gain). ``--profile`` also prints where the eager loop's time goes (host
cProfile, GPU kernel table, kernels and GPU ms per token).

    python -m benchmarks.bench_decode [--preset bagel-7b-mot] [--tokens 32] [--quantization fp8] [--profile]
"""
from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bagel_kernels import default_options
from bagel_model.engine.decode import greedy_decode
from bagel_model.engine.prefill import TextBlock, prefill
from bagel_model.serving.split import ModelSpec

from .common import add_output_args, emit, require_cuda, row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b-mot")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quantization", choices=["none", "fp8"], default="none",
                    help="fp8: also time FP8 projection weights, against bf16 in the same run")
    ap.add_argument("--profile", action="store_true",
                    help="host cProfile + GPU kernel table of the eager loop, kernels and GPU ms per token")
    return add_output_args(ap)


def _profile(model, fresh, tokens: int) -> None:
    ctx, h = fresh()
    pr = cProfile.Profile()
    pr.enable()
    greedy_decode(model, ctx, h, tokens, eos_id=-1, use_graph=False)
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
    print(s.getvalue()[:6000], flush=True)
    ctx, h = fresh()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        greedy_decode(model, ctx, h, tokens, eos_id=-1, use_graph=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)[:5000])
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    gpu_us = sum(e.device_time_total for e in kernels) / tokens
    launches = sum(e.count for e in kernels) / tokens
    print(f"GPU kernel time per token (eager) {gpu_us / 1e3:.2f} ms in {launches:.0f} kernels", flush=True)


# the loops timed: eager, the CUDA graph one step ahead (the default), the CUDA graph one step at a time (its peer)
LOOPS = {"eager": dict(use_graph=False), "graph": dict(use_graph=True),
         "one step at a time": dict(use_graph=True, look_ahead=False)}


def _time(a, quantization: str) -> tuple[dict, dict]:
    spec = ModelSpec(preset=a.preset, dtype="bfloat16", device="cuda",
                     kernels=dataclasses.replace(default_options(), quantization=quantization))
    model, _ = spec.load()
    ms, tokens = {}, {}
    with torch.no_grad():
        def fresh():
            return prefill(model, [TextBlock(list(range(100, 164)))], extra_capacity=2 * a.tokens + 8)

        for loop, kw in LOOPS.items():
            ctx, h = fresh()
            greedy_decode(model, ctx, h, 4, eos_id=-1, **kw)  # warm-up (compiles)
            ctx, h = fresh()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[loop] = greedy_decode(model, ctx, h, a.tokens, eos_id=-1, **kw)
            torch.cuda.synchronize()
            ms[loop] = (time.perf_counter() - t0) / a.tokens * 1e3
        if a.profile:
            _profile(model, fresh, a.tokens)
    return ms, tokens


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    require_cuda("bench_decode")
    ms, tokens = _time(a, "none")
    torch.cuda.empty_cache()  # the bf16 model is gone: its blocks back before the FP8 one is drawn
    same = "tokens == eager" if tokens["graph"] == tokens["eager"] else "tokens DIFFER from eager"
    shape = f"{a.preset} greedy decode after a 64-token prompt, {a.tokens} tokens"
    step1 = "one step at a time"
    same1 = "tokens == eager" if tokens[step1] == tokens["eager"] else "tokens DIFFER from eager"
    rows = [row(f"decode CUDA graph ({same})", shape, "ms/token", ms["graph"], "eager", ms["eager"]),
            row(f"decode CUDA graph, one step ahead ({same})", shape, "ms/token", ms["graph"],
                f"CUDA graph {step1}", ms[step1]),
            row(f"decode CUDA graph {step1} ({same1})", shape, "ms/token", ms[step1]),
            row("decode eager", shape, "ms/token", ms["eager"])]
    if a.quantization == "fp8":
        ms8, tokens8 = _time(a, "fp8")
        same8 = "tokens == eager" if tokens8["graph"] == tokens8["eager"] else "tokens DIFFER from eager"
        rows += [row(f"decode fp8 CUDA graph ({same8})", shape, "ms/token", ms8["graph"], "bf16 CUDA graph",
                     ms["graph"]),
                 row(f"decode fp8 CUDA graph {step1}", shape, "ms/token", ms8[step1], f"bf16 CUDA graph {step1}",
                     ms[step1]),
                 row("decode fp8 eager", shape, "ms/token", ms8["eager"], "bf16 eager", ms["eager"])]
    emit(rows, a)


if __name__ == "__main__":
    main()
