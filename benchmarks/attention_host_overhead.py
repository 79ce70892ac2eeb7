"""Host (CPU) time per ``joint_attention`` call on a small shape, where eager runs are launch-bound: the Gluon kernel
vs the Triton kernel (``BAGEL_ATTN_GLUON=0``). Run on the GPU: ``python benchmarks/attention_host_overhead.py
[--profile]``. The GPU runs ahead of the host here (512² ctx 64: ~40 µs of GPU time per call), so the time per call
of a launch loop is the host's."""
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

import bagel_kernels as bk  # noqa: E402


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
    for flag, name in (("1", "gluon"), ("0", "triton")):
        os.environ["BAGEL_ATTN_GLUON"] = flag
        print(f"{name}: {per_call_us(lambda: bk.joint_attention(q, segs)):.1f} us host time per call", flush=True)
    os.environ["BAGEL_ATTN_GLUON"] = "1"
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
