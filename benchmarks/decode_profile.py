"""Where AR decode time goes (GPU): per-token wall time, host profile, and GPU kernel time per token.

    python benchmarks/decode_profile.py [--preset bagel-7b-mot] [--tokens 32]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    from bagel_model.prefill import TextBlock, greedy_decode, prefill
    from bagel_model.split import ModelSpec

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="bagel-7b-mot")
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    model, tok = ModelSpec(preset=a.preset, dtype="bfloat16", device="cuda").load()
    with torch.no_grad():
        ctx, h = prefill(model, [TextBlock(list(range(100, 164)))], extra_capacity=4 * a.tokens + 8)
        greedy_decode(model, ctx, h, 4, eos_id=-1)  # warm-up (compiles)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        greedy_decode(model, ctx, h, a.tokens, eos_id=-1)
        torch.cuda.synchronize()
        per_tok = (time.perf_counter() - t0) / a.tokens
        print(f"per token {per_tok * 1e3:.1f} ms", flush=True)
        pr = cProfile.Profile()
        pr.enable()
        greedy_decode(model, ctx, h, a.tokens, eos_id=-1)
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
        print(s.getvalue()[:6000], flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            greedy_decode(model, ctx, h, a.tokens, eos_id=-1)
            torch.cuda.synchronize()
        tbl = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        print(tbl[:5000])
        gpu_us = sum(e.device_time_total for e in prof.key_averages()) / a.tokens
        print(f"GPU kernel time per token {gpu_us / 1e3:.2f} ms vs wall {per_tok * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
