"""Question: which cuBLAS kernel does the dense peer run on the prefill projections (M = 4198), and is wave quantization why the routed GEMM trails it? Finding (H100, 2026-11-24): cuBLAS runs nvjet 192x192 / 256x152 tiles with 2-CTA clusters (38–40 k outputs per tile vs our 32 k); with one expert we are still at 0.87 on N = 3584/4608, so the per-tile mainloop, not wave quantization, is the main gap.

    python -m probes.gemm_peer_kernels [--m 4198] [--json OUT]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import bagel_kernels as bk

SHAPES = {"qkv": (4608, 3584), "o_proj": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944)}  # (N, K)


def cublas_kernels(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    ap.add_argument("--m", type=int, default=4198)
    a = ap.parse_args()
    m = a.m
    rows = []
    for name, (n, k) in SHAPES.items():
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2, 1, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        mixed = bk.ExpertSegments.from_flags([False] * 40 + [True] * (m - 100) + [False] * 60)
        ids = mixed.expert_ids("cuda")
        dense = lambda: F.linear(x, w[1, 0])  # noqa: E731
        t_dense = do_bench_cudagraph(dense)
        t_mixed = do_bench_cudagraph(lambda: bk.routed_linear(x, mixed, w, expert_ids=ids))
        t_gen = do_bench_cudagraph(lambda: bk.routed_linear(x, bk.ExpertSegments.uniform(m, True), w))
        tf = lambda ms: 2 * m * n * k / ms / 1e9  # noqa: E731
        row = {"proj": name, "M": m, "N": n, "K": k, "dense_tflops": tf(t_dense), "ours_mixed_tflops": tf(t_mixed),
               "ours_one_expert_tflops": tf(t_gen), "mixed/dense": t_dense / t_mixed,
               "one_expert/dense": t_dense / t_gen, "cublas_kernels": cublas_kernels(dense)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.json:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
                  open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
