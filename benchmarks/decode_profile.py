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
    a = ap.parse_args()
    small_batch_checks()
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
