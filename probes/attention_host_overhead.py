"""Question: what does one ``joint_attention`` call cost the host where eager runs are launch-bound (512² ctx 64, ~40 µs of GPU time per call)? Finding (H100, 2026-11-24): the Gluon path cost 327 µs per call until its shared-memory layouts were cached, 149 µs after.

    python -m probes.attention_host_overhead [--profile]      (on a GPU; Gluon vs Triton, host time per call)
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

import bagel_kernels as bk


def per_call_us(fn, n: int = 300) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="store_true", help="also print the top functions of a cProfile of the Gluon path")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    q = torch.randn(1026, 28, 128, device=dev, dtype=dt)
    k, v = torch.randn(1026, 4, 128, device=dev, dtype=dt), torch.randn(1026, 4, 128, device=dev, dtype=dt)
    ck, cv = torch.randn(64, 4, 128, device=dev, dtype=dt), torch.randn(64, 4, 128, device=dev, dtype=dt)
    segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
    for name in ("gluon", "triton"):
        opts = bk.KernelOptions(backend=name)
        print(f"{name}: {per_call_us(lambda: bk.joint_attention(q, segs, options=opts)):.1f} us host time per call",
              flush=True)
    if args.profile:
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            bk.joint_attention(q, segs)
        pr.disable()
        out = io.StringIO()
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())


if __name__ == "__main__":
    main()
