"""Stage 0's text decoding on the GPU: ms per greedy token, eager vs the CUDA-graph token step (and whether both
give the same tokens), BAGEL-7B-MoT random bf16 after a 64-token prompt. ``--profile`` also prints where the eager
loop's time goes (host cProfile, GPU kernel table).

    python -m benchmarks.bench_decode [--preset bagel-7b-mot] [--tokens 32] [--profile] [--no-csv]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bagel_model.engine.decode import greedy_decode
from bagel_model.engine.prefill import TextBlock, prefill
from bagel_model.serving.split import ModelSpec

from .common import add_output_args, emit, require_cuda, row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b-mot")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="host cProfile + GPU kernel table of the eager loop")
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
    gpu_us = sum(e.device_time_total for e in prof.key_averages()) / tokens
    print(f"GPU kernel time per token (eager) {gpu_us / 1e3:.2f} ms", flush=True)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    require_cuda("bench_decode")
    model, tok = ModelSpec(preset=a.preset, dtype="bfloat16", device="cuda").load()
    ms, tokens = {}, {}
    with torch.no_grad():
        def fresh():
            return prefill(model, [TextBlock(list(range(100, 164)))], extra_capacity=2 * a.tokens + 8)

        for use_graph in (False, True):
            ctx, h = fresh()
            greedy_decode(model, ctx, h, 4, eos_id=-1, use_graph=use_graph)  # warm-up (compiles)
            ctx, h = fresh()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[use_graph] = greedy_decode(model, ctx, h, a.tokens, eos_id=-1, use_graph=use_graph)
            torch.cuda.synchronize()
            ms[use_graph] = (time.perf_counter() - t0) / a.tokens * 1e3
        if a.profile:
            _profile(model, fresh, a.tokens)
    same = "tokens == eager" if tokens[True] == tokens[False] else "tokens DIFFER from eager"
    shape = f"{a.preset} greedy decode after a 64-token prompt, {a.tokens} tokens"
    emit([row(f"decode CUDA graph ({same})", shape, "ms/token", ms[True], "eager", ms[False]),
          row("decode eager", shape, "ms/token", ms[False])], a)


if __name__ == "__main__":
    main()
