"""Joint attention on BAGEL's shapes: ours (``joint_attention``: the Gluon kernel on Hopper, or ``--backend triton``)
against cuDNN / FLASH / EFFICIENT SDPA and FlexAttention. TFLOP/s = 4·Hq·Nq·Nk·D / time (non-causal; for the
prefill mask the visible pairs only), each row's ratio against the best peer of that shape.

    python -m benchmarks.bench_attention [--backend auto|triton] [--no-graph] [--no-csv]
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch

import bagel_kernels as bk

from .common import add_output_args, bench_ms, emit, require_cuda, row
from .peers import attention_peers

HQ, HKV, D = 28, 4, 128
SHAPES = [  # (name, query tokens, context tokens)
    ("1024² t2i ctx 128", 4098, 128),
    ("1024² ctx 1024", 4098, 1024),
    ("1024² i2i ctx 8192", 4098, 8192),
    ("512² ctx 64", 1026, 64),
    ("512² i2i ctx 2450", 1026, 2450),
]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_attention", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "triton"],
                   help="ours: auto (Gluon on Hopper where it applies) or the Triton kernel only")
    p.add_argument("--no-graph", action="store_true", help="time with do_bench (launch overhead) not graph replay")
    return add_output_args(p)


def _best(subject: str, shape: str, ours: float, peers: dict[str, float]) -> list[dict]:
    rows = [row(subject, shape, "TFLOP/s", ours)]
    if peers:
        best = max(peers, key=peers.get)
        rows = [row(subject, shape, "TFLOP/s", ours, best, peers[best])]
        rows += [row(f"peer {name}", shape, "TFLOP/s", val) for name, val in peers.items()]
    return rows


def run(args: argparse.Namespace) -> Iterator[dict]:
    opts = bk.KernelOptions(backend=args.backend)
    graph = not args.no_graph
    subject = f"attention ({args.backend})"
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for name, nq, nctx in SHAPES:
        q = torch.randn(nq, HQ, D, device=dev, dtype=dt)
        k, v = (torch.randn(nq, HKV, D, device=dev, dtype=dt) for _ in range(2))
        ck, cv = (torch.randn(nctx, HKV, D, device=dev, dtype=dt) for _ in range(2))
        segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
        tf = lambda ms: 4 * HQ * nq * (nq + nctx) * D / (ms * 1e-3) / 1e12  # noqa: E731
        ours = tf(bench_ms(lambda: bk.joint_attention(q, segs, options=opts), graph))
        kk, vv = torch.cat([ck, k]), torch.cat([cv, v])
        peers = {p: tf(bench_ms(f, graph)) for p, f in attention_peers(q, kk, vv).items()}
        yield from _best(subject, name, ours, peers)
    # three CFG branches in one varlen launch (contexts 64, 0, 64) vs cuDNN launched per branch
    nq, ctxs = 4098, [64, 0, 64]
    q = torch.randn(3 * nq, HQ, D, device=dev, dtype=dt)
    k, v = (torch.randn(3 * nq, HKV, D, device=dev, dtype=dt) for _ in range(2))
    ck = torch.randn(sum(ctxs), HKV, D, device=dev, dtype=dt)
    cu = torch.tensor([0, nq, 2 * nq, 3 * nq], dtype=torch.int32, device=dev)
    ccu = torch.tensor([0, 64, 64, 128], dtype=torch.int32, device=dev)
    segs = [bk.ContiguousKV(ck, ck, cu_seqlens=ccu, max_seqlen=64), bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=nq)]
    flops = sum(4 * HQ * nq * (nq + c) * D for c in ctxs)
    ms = bench_ms(lambda: bk.joint_attention(q, segs, cu_seqlens_q=cu, max_seqlen_q=nq, options=opts), graph)
    peer_ms = 0.0
    for b, c in enumerate(ctxs):
        kk = torch.cat([ck[ccu[b]:ccu[b] + c], k[b * nq:(b + 1) * nq]])
        vv = torch.cat([ck[ccu[b]:ccu[b] + c], v[b * nq:(b + 1) * nq]])
        peer_ms += bench_ms(attention_peers(q[b * nq:(b + 1) * nq], kk, vv, flex=False)["cudnn"], graph)
    tf = lambda t: flops / (t * 1e-3) / 1e12  # noqa: E731
    yield row(subject, "3-branch CFG varlen (ctx 64, 0, 64)", "TFLOP/s", tf(ms), "cudnn (3 launches)", tf(peer_ms))
    # prefill with the mixed mask: 40 text tokens, a 4098-token image span, 30 text tokens
    span = torch.tensor([-1] * 40 + [0] * 4098 + [-1] * 30, dtype=torch.int32, device=dev)
    n = span.shape[0]
    vis = bk.prefill_visible_end(span)
    q = torch.randn(n, HQ, D, device=dev, dtype=dt)
    k, v = (torch.randn(n, HKV, D, device=dev, dtype=dt) for _ in range(2))
    dense = torch.arange(n, device=dev)[None, :] < vis[:, None]
    pairs = dense.sum().item()
    tf = lambda t: 4 * HQ * pairs * D / (t * 1e-3) / 1e12  # noqa: E731
    ours = tf(bench_ms(lambda: bk.joint_attention(q, [bk.ContiguousKV(k, v)], visible_end=vis, options=opts), graph))
    peers = {p: tf(bench_ms(f, graph)) for p, f in attention_peers(q, k, v, mask=dense[None, None]).items()}
    yield from _best(subject, f"prefill mixed mask n={n}", ours, peers)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_cuda("bench_attention")
    emit(run(args), args)


if __name__ == "__main__":
    main()
