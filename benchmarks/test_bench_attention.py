"""pytest-benchmark entry for the attention kernels vs cuDNN SDPA on BAGEL shapes (GPU only): ``bagel`` is what
``joint_attention`` dispatches to (the Gluon kernel on Hopper), ``bagel_triton`` the Triton kernel
(``KernelOptions(backend="triton")``); both give the same bits.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only      # on the GPU machine
The full table with every peer and TFLOP/s ratios: ``python -m benchmarks.bench_attention``.
"""
import pytest
import torch

import bagel_kernels as bk
from benchmarks.peers import attention_peers

HQ, HKV, D = 28, 4, 128

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")


@pytest.mark.parametrize("nq,nctx", [(4098, 128), (4098, 1024), (4098, 8192), (1026, 64)])
@pytest.mark.parametrize("impl", ["bagel", "bagel_triton", "sdpa_cudnn"])
def test_attention(benchmark, impl, nq, nctx):
    dt = torch.bfloat16
    q = torch.randn(nq, HQ, D, device="cuda", dtype=dt)
    k, v = (torch.randn(nq + nctx, HKV, D, device="cuda", dtype=dt) for _ in range(2))
    opts = bk.KernelOptions(backend="triton" if impl == "bagel_triton" else "auto")
    if impl.startswith("bagel"):
        segs = [bk.ContiguousKV(k[:nctx], v[:nctx]), bk.ContiguousKV(k[nctx:], v[nctx:])]
        fn = lambda: bk.joint_attention(q, segs, options=opts)
    else:
        fn = attention_peers(q, k, v, flex=False)["cudnn"]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
    benchmark.extra_info["TFLOP/s"] = 4 * HQ * nq * (nq + nctx) * D / benchmark.stats.stats.median / 1e12
