"""pytest-benchmark entry for the attention kernels vs cuDNN SDPA on BAGEL shapes (GPU only): ``bagel`` is what
``joint_attention`` dispatches to (the Gluon kernel on Hopper), ``bagel_triton`` the Triton kernel
(``BAGEL_ATTN_GLUON=0``); both give the same bits.

    python -m pytest benchmarks/test_bench_attention.py --benchmark-only      # on the GPU machine
The full table with every peer and TFLOP/s ratios: ``python benchmarks/attention_shapes.py``.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU benchmark")


@pytest.mark.parametrize("nq,nctx", [(4098, 128), (4098, 1024), (4098, 8192), (1026, 64)])
@pytest.mark.parametrize("impl", ["bagel", "bagel_triton", "sdpa_cudnn"])
def test_attention(benchmark, impl, nq, nctx, monkeypatch):
    import bagel_kernels as bk
    from attention_shapes import HKV, HQ, D, peers

    dt = torch.bfloat16
    q = torch.randn(nq, HQ, D, device="cuda", dtype=dt)
    k, v = (torch.randn(nq + nctx, HKV, D, device="cuda", dtype=dt) for _ in range(2))
    if impl == "bagel_triton":
        monkeypatch.setenv("BAGEL_ATTN_GLUON", "0")
    if impl.startswith("bagel"):
        segs = [bk.ContiguousKV(k[:nctx], v[:nctx]), bk.ContiguousKV(k[nctx:], v[nctx:])]
        fn = lambda: bk.joint_attention(q, segs)
    else:
        fn = peers(q, k, v)["cudnn"]

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=50, warmup_rounds=5)
    benchmark.extra_info["TFLOP/s"] = 4 * HQ * nq * (nq + nctx) * D / benchmark.stats.stats.median / 1e12
