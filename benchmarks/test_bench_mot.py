"""pytest-benchmark entry for the routed MoT GEMM vs one dense cuBLAS GEMM on BAGEL-7B shapes (GPU only).

    python -m pytest benchmarks/test_bench_mot.py --benchmark-only      # on the GPU machine
The full table with every peer: ``python -m benchmarks.bench_routed_gemm``; the whole layer: ``bench_layer``.
"""
import pytest
import torch
import torch.nn.functional as F

import bagel_kernels as bk
from benchmarks.shapes import PROJECTIONS, token_sets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")


@pytest.mark.parametrize("proj", ["qkv", "o_proj", "gate_up", "down"])
@pytest.mark.parametrize("tokens", ["gen step 3×4098", "i2i prefill mixed"])
@pytest.mark.parametrize("impl", ["bagel_routed", "dense_cublas"])
def test_projection(benchmark, impl, tokens, proj):
    _, n, k, swiglu = next(p for p in PROJECTIONS if p[0] == proj)
    routing = token_sets()[tokens]
    m, parts = routing.num_tokens, 2 if swiglu else 1
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2, parts, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    ids = routing.expert_ids("cuda")
    if impl == "bagel_routed":
        fn = lambda: bk.routed_linear(x, routing, w, activation="swiglu" if swiglu else None, expert_ids=ids)
    else:
        dense = w[1].reshape(parts * n, k)
        fn = lambda: F.linear(x, dense)

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=30, warmup_rounds=3)
    benchmark.extra_info["TFLOP/s"] = 2 * m * n * k * parts / benchmark.stats.stats.median / 1e12
