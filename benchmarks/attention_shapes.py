"""BAGEL attention shapes vs PyTorch's attention backends; prints TFLOP/s and the ratio to the best peer.

Run on the GPU: ``python benchmarks/attention_shapes.py [--json OUT]`` (``BAGEL_BENCH_CUDAGRAPH=1``: graph replay). TFLOP/s = 4*Hq*Nq*Nk*D / time (non-causal;
for the prefill mask the FLOPs of the visible pairs only). Peers: SDPA cuDNN / FLASH / EFFICIENT (K/V expanded for
GQA), FlexAttention (compiled, GQA native), flash-attn if importable.
"""
from __future__ import annotations

import argparse
import json

import torch

HQ, HKV, D = 28, 4, 128
SHAPES = [  # (name, query tokens, context tokens)
    ("1024² t2i ctx128", 4098, 128),
    ("1024² ctx1024", 4098, 1024),
    ("1024² i2i ctx8192", 4098, 8192),
    ("512² ctx64", 1026, 64),
    ("512² i2i ctx2450", 1026, 2450),
]


def bench(fn) -> float:
    """Median ms. ``BAGEL_BENCH_CUDAGRAPH=1`` replays a CUDA graph: GPU time without Python launch overhead
    (what a kernel costs inside a busy denoise step, where launches run ahead of the GPU)."""
    import os

    from triton.testing import do_bench, do_bench_cudagraph

    if os.environ.get("BAGEL_BENCH_CUDAGRAPH") == "1":
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def tflops(nq, nk, ms, hq=HQ):
    return 4 * hq * nq * nk * D / (ms * 1e-3) / 1e12


def peers(q, k, v, mask=None):
    """Peer callables on (1, H, N, D) layouts with expanded K/V."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qh = q.transpose(0, 1)[None]
    kh = k.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None].contiguous()
    vh = v.repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None].contiguous()
    out = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def f(be=be):
            with sdpa_kernel([be]):
                return torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        try:
            f()
            out[name] = f
        except RuntimeError:
            pass
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention)
        kg, vg = k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()
        if mask is None:
            g = lambda: flex(qh, kg, vg, enable_gqa=True)
            g()
            out["flex"] = g
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        print("flex unavailable:", type(e).__name__, e)
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except ImportError:
        pass
    return out


def run(json_path: str | None = None) -> list[dict]:
    import bagel_kernels as bk

    torch.manual_seed(0)
    rows = []
    for name, nq, nctx in SHAPES:
        dev, dt = "cuda", torch.bfloat16
        q = torch.randn(nq, HQ, D, device=dev, dtype=dt)
        k = torch.randn(nq, HKV, D, device=dev, dtype=dt)
        v = torch.randn(nq, HKV, D, device=dev, dtype=dt)
        ck = torch.randn(nctx, HKV, D, device=dev, dtype=dt)
        cv = torch.randn(nctx, HKV, D, device=dev, dtype=dt)
        segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
        ours = lambda: bk.joint_attention(q, segs)
        kk, vv = torch.cat([ck, k]), torch.cat([cv, v])
        res = {"shape": name, "nq": nq, "nk": nq + nctx}
        res["ours"] = tflops(nq, nq + nctx, bench(ours))
        for pname, f in peers(q, kk, vv).items():
            res[pname] = tflops(nq, nq + nctx, bench(f))
        best = max((v_ for k_, v_ in res.items() if k_ in ("cudnn", "flash", "efficient", "flex")), default=float("nan"))
        res["ratio_vs_best_peer"] = res["ours"] / best
        rows.append(res)
        print(json.dumps(res))
    # three CFG branches in one varlen launch (contexts 64, 0, 64)
    nq, ctxs = 4098, [64, 0, 64]
    q = torch.randn(3 * nq, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(3 * nq, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    ck = torch.randn(sum(ctxs), HKV, D, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, nq, 2 * nq, 3 * nq], dtype=torch.int32, device="cuda")
    ccu = torch.tensor([0, 64, 64, 128], dtype=torch.int32, device="cuda")
    segs = [bk.ContiguousKV(ck, ck, cu_seqlens=ccu, max_seqlen=64), bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=nq)]
    ms = bench(lambda: bk.joint_attention(q, segs, cu_seqlens_q=cu, max_seqlen_q=nq))
    flops = sum(4 * HQ * nq * (nq + c) * D for c in ctxs)
    sdpa_ms = 0.0
    for b, c in enumerate(ctxs):
        kk = torch.cat([ck[ccu[b]:ccu[b] + c], k[b * nq:(b + 1) * nq]])
        vv = torch.cat([ck[ccu[b]:ccu[b] + c], v[b * nq:(b + 1) * nq]])
        f = peers(q[b * nq:(b + 1) * nq], kk, vv).get("cudnn")
        sdpa_ms += bench(f) if f else float("nan")
    row = {"shape": "3-branch CFG varlen (ctx 64,0,64)", "ours": flops / (ms * 1e-3) / 1e12,
           "cudnn (3 launches)": flops / (sdpa_ms * 1e-3) / 1e12}
    row["ratio_vs_best_peer"] = row["ours"] / row["cudnn (3 launches)"]
    rows.append(row)
    print(json.dumps(row))
    # prefill with the mixed mask: 40 text tokens, a 4098-token image span, 30 text tokens
    span = torch.tensor([-1] * 40 + [0] * 4098 + [-1] * 30, dtype=torch.int32, device="cuda")
    n = span.shape[0]
    vis = bk.prefill_visible_end(span)
    q = torch.randn(n, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    dense = torch.arange(n, device="cuda")[None, :] < vis[:, None]
    pairs = dense.sum().item()
    ms = bench(lambda: bk.joint_attention(q, [bk.ContiguousKV(k, v)], visible_end=vis))
    row = {"shape": f"prefill mixed mask n={n}", "ours": 4 * HQ * pairs * D / (ms * 1e-3) / 1e12}
    for pname, f in peers(q, k, v, mask=dense[None, None]).items():
        row[pname] = 4 * HQ * pairs * D / (bench(f) * 1e-3) / 1e12
    best = max((v_ for k_, v_ in row.items() if k_ in ("cudnn", "flash", "efficient", "flex")), default=float("nan"))
    row["ratio_vs_best_peer"] = row["ours"] / best
    rows.append(row)
    print(json.dumps(row))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    run(ap.parse_args().json)
