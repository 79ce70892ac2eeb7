"""The routed MoT GEMM on BAGEL-7B's projections: ours in exact mode (the batch-invariant Gluon kernel on Hopper,
or ``--backend triton``) and in fast mode (cuBLAS per expert where it wins), against one dense cuBLAS GEMM of the
same total size and (without graph replay) the eager mask/scatter path and its ``torch.compile`` -- each with the
epilogue the model runs (qkv + bias, o_proj and down + residual, gate_up SwiGLU).
TFLOP/s = 2·M·N·K (× 2 parts for SwiGLU gate/up) / median time.

    python -m benchmarks.bench_routed_gemm [--backend auto|triton] [--no-graph] [--no-csv]
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch

import bagel_kernels as bk

from .common import add_output_args, bench_ms, emit, require_cuda, row
from .peers import projection_peers
from .shapes import EPILOGUE, PROJECTIONS, token_sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_routed_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "triton"],
                   help="exact mode's kernel: auto (Gluon on Hopper) or the Triton kernel only")
    p.add_argument("--no-graph", action="store_true",
                   help="time with do_bench (launch overhead; adds the mask/scatter peers, which synchronize)")
    return add_output_args(p)


def run(args: argparse.Namespace) -> Iterator[dict]:
    graph = not args.no_graph
    exact = bk.KernelOptions(backend=args.backend)
    fast = bk.KernelOptions(backend=args.backend, mode="fast")
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for tname, routing in token_sets().items():
        m = routing.num_tokens
        ids = routing.expert_ids(dev)
        for pname, n, k, swiglu in PROJECTIONS:
            p = 2 if swiglu else 1
            w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
            x = torch.randn(m, k, device=dev, dtype=dt)
            act = "swiglu" if swiglu else None
            bias = torch.randn(2, p, n, device=dev, dtype=dt) * 0.02 if EPILOGUE[pname] == "bias" else None
            res = torch.randn(m, n, device=dev, dtype=dt) if EPILOGUE[pname] == "residual" else None
            tf = lambda ms: 2 * m * n * k * p / (ms * 1e-3) / 1e12  # noqa: E731
            shape = f"{tname} {pname}{' +' + EPILOGUE[pname] if EPILOGUE[pname] else ''} M={m} N={n * p} K={k}"
            peers = {name: tf(bench_ms(f, graph))
                     for name, f in projection_peers(x, ids.bool(), w, swiglu, graph, bias, res).items()}
            dense = peers["dense cuBLAS"]
            ours = tf(bench_ms(lambda: bk.routed_linear(x, routing, w, bias, activation=act, residual=res,
                                                            expert_ids=ids, options=exact),
                               graph))
            ours_fast = tf(bench_ms(lambda: bk.routed_linear(x, routing, w, bias, activation=act, residual=res,
                                                                 options=fast), graph))
            yield row(f"routed GEMM exact ({args.backend})", shape, "TFLOP/s", ours, "dense cuBLAS", dense)
            yield row("routed GEMM fast", shape, "TFLOP/s", ours_fast, "dense cuBLAS", dense)
            yield from [row(f"peer {name}", shape, "TFLOP/s", val) for name, val in peers.items()]


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_cuda("bench_routed_gemm")
    emit(run(args), args)


if __name__ == "__main__":
    main()
