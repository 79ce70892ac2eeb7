"""AR decode on the GPU: per-token time eager vs CUDA-graph replay (same tokens?), and with ``--profile`` where the
eager loop's time goes (host cProfile, GPU kernel time per token).

    python benchmarks/decode_profile.py [--preset bagel-7b-mot] [--tokens 32] [--profile]
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


def small_batch_checks() -> dict:
    """The decode GEMM on the device: accuracy vs float64 and bitwise rows across M <= 16."""
    import bagel_kernels as bk

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(16, 3584, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2, 2, 1024, 3584, device="cuda", generator=g) * 0.02).bfloat16()
    r = bk.ExpertSegments.from_flags([i >= 9 for i in range(16)])
    full = bk.routed_linear(x, r, w, activation="swiglu", small_batch=True)
    same = all(torch.equal(bk.routed_linear(x[a:c], r.slice(a, c), w, activation="swiglu", small_batch=True), full[a:c])
               for a, c in ((0, 1), (3, 12), (15, 16)))
    ids = r.expert_ids("cuda").long()
    parts = [torch.einsum("mk,mnk->mn", x.double(), w.double()[ids, j]) for j in range(2)]
    want = torch.nn.functional.silu(parts[0]) * parts[1]
    res = {"rows_bitwise": same, "rel_err_bf16_swiglu": ((full.double() - want).norm() / want.norm()).item()}
    print("small-batch checks", res, flush=True)
    return res


def main() -> None:
    from bagel_model.prefill import TextBlock, greedy_decode, prefill
    from bagel_model.split import ModelSpec

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="bagel-7b-mot")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="host cProfile + GPU kernel table of the eager loop")
    a = ap.parse_args()
    small_batch_checks()
    model, tok = ModelSpec(preset=a.preset, dtype="bfloat16", device="cuda").load()
    res = {}
    with torch.no_grad():
        def fresh():
            return prefill(model, [TextBlock(list(range(100, 164)))], extra_capacity=2 * a.tokens + 8)

        tokens = {}
        for use_graph in (False, True):
            ctx, h = fresh()
            greedy_decode(model, ctx, h, 4, eos_id=-1, use_graph=use_graph)  # warm-up (compiles)
            ctx, h = fresh()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            tokens[use_graph] = greedy_decode(model, ctx, h, a.tokens, eos_id=-1, use_graph=use_graph)
            torch.cuda.synchronize()
            res[f"ms_per_token_graph={use_graph}"] = (time.perf_counter() - t0) / a.tokens * 1e3
        res["graph_tokens_equal_eager"] = tokens[True] == tokens[False]
        print("decode", res, flush=True)
        if a.profile:
            ctx, h = fresh()
            pr = cProfile.Profile()
            pr.enable()
            greedy_decode(model, ctx, h, a.tokens, eos_id=-1, use_graph=False)
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(22)
            print(s.getvalue()[:6000], flush=True)
            from torch.profiler import ProfilerActivity, profile

            ctx, h = fresh()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                greedy_decode(model, ctx, h, a.tokens, eos_id=-1, use_graph=False)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)[:5000])
            gpu_us = sum(e.device_time_total for e in prof.key_averages()) / a.tokens
            print(f"GPU kernel time per token (eager) {gpu_us / 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
