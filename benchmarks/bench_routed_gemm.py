"""The routed MoT GEMM on BAGEL-7B's projections: ours in exact mode (the batch-invariant Gluon kernel on Hopper,
or ``--backend triton``) and in fast mode (cuBLAS per expert where it wins), against one dense cuBLAS GEMM of the
same total size and (without graph replay) the eager mask/scatter path and its ``torch.compile`` -- each with the
epilogue the model runs (qkv + bias, o_proj and down + residual, gate_up SwiGLU).
TFLOP/s = 2·M·N·K (× 2 parts for SwiGLU gate/up) / median time.

``--sweep`` (issue #32) instead times the exact Gluon kernel's schedule variants against dense cuBLAS with the same
epilogue at every shape the model runs — the 1024² and 512² CFG steps (2 jobs + 4 marker rows), img2img's 3 jobs,
the img2img prefill, and a sequence-parallel rank's share (M/2, M/4) of the 1024² step. Every variant keeps the
K loop (BLOCK_K = 64, fp32, in K order), so all of them give the same bits; only speed differs: the L2 tile order
(GROUP_M), the N tile (256 or 128; Gluon's tiles are powers of two), the ring depth, the stream-K split of the last
round, and whether the two consumer warpgroups are one partition (shipped) or two.

``--quantization fp8`` (issue #30) instead times the FP8 routed GEMM the model runs with ``quantization="fp8"`` on
the same row sets, with its peers in the same run (``torch._scaled_mm`` with the same scaling, precise and fast
accumulation; this project's bf16 routed GEMM in exact mode; bf16 dense cuBLAS): ``bench_fp8_gemm``'s rows, which
also sweeps the FP8 kernel's configs and times its quantizers.

    python -m benchmarks.bench_routed_gemm [--backend auto|triton] [--no-graph] [--sweep [--variants NAME ...]
        [--sets NAME ...]] [--quantization fp8] [--no-csv]
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch

import bagel_kernels as bk

from .common import add_output_args, bench_ms, emit, require_cuda, row
from .peers import projection_peers
from .shapes import EPILOGUE, PROJECTIONS, sweep_token_sets, token_sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_routed_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["auto", "triton"],
                   help="exact mode's kernel: auto (Gluon on Hopper) or the Triton kernel only")
    p.add_argument("--no-graph", action="store_true",
                   help="time with do_bench (launch overhead; adds the mask/scatter peers, which synchronize)")
    p.add_argument("--sweep", action="store_true",
                   help="time the exact Gluon kernel's schedule variants against dense cuBLAS instead (issue #32)")
    p.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                   help="with --sweep: only these schedule variants, besides the shipped one (names as in the rows: "
                        "'GROUP_M 16', 'no split tail', 'two consumer partitions', ...)")
    p.add_argument("--sets", nargs="+", default=None, metavar="NAME",
                   help="with --sweep: only these row sets (e.g. 't2i 1024² step 2×4098+4', 'i2i prefill mixed')")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"],
                   help="fp8: time the FP8 routed GEMM (KernelOptions(quantization='fp8')) against torch._scaled_mm "
                        "and the bf16 GEMMs instead (issue #30)")
    return add_output_args(p)


def projection_case(m: int, pname: str, n: int, k: int, swiglu: bool, dev: str = "cuda",
                    dt: torch.dtype = torch.bfloat16):
    """Random operands of one projection with the model's epilogue: (parts, weight, x, bias, residual, TFLOP/s of a
    time in ms)."""
    p = 2 if swiglu else 1
    w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
    x = torch.randn(m, k, device=dev, dtype=dt)
    bias = torch.randn(2, p, n, device=dev, dtype=dt) * 0.02 if EPILOGUE[pname] == "bias" else None
    res = torch.randn(m, n, device=dev, dtype=dt) if EPILOGUE[pname] == "residual" else None
    return p, w, x, bias, res, lambda ms: 2 * m * n * k * p / (ms * 1e-3) / 1e12


def cases(sets: dict[str, bk.ExpertSegments]) -> Iterator[tuple]:
    """Every (row set, projection) case: (routing, its device expert ids, (name, N, K, swiglu), ``projection_case``,
    the row's shape label)."""
    torch.manual_seed(0)
    for tname, routing in sets.items():
        m = routing.num_tokens
        ids = routing.expert_ids("cuda")
        for pname, n, k, swiglu in PROJECTIONS:
            case = projection_case(m, pname, n, k, swiglu)
            shape = f"{tname} {pname}{' +' + EPILOGUE[pname] if EPILOGUE[pname] else ''} M={m} N={n * case[0]} K={k}"
            yield routing, ids, (pname, n, k, swiglu), case, shape


def sweep_variants(swiglu: bool) -> dict[str, dict]:
    """Schedules of the exact kernel: (block_n, stages, group_m, split_tail, and split_wg where on); the first is
    the shipped one."""
    from bagel_kernels.routed_gemm_gluon import GROUP_M, _block_n, _stages

    bn, st = _block_n(swiglu), _stages(swiglu)
    v = {"shipped": dict(block_n=bn, stages=st, group_m=GROUP_M, split_tail=None),
         "GROUP_M 4": dict(block_n=bn, stages=st, group_m=4, split_tail=None),
         "GROUP_M 16": dict(block_n=bn, stages=st, group_m=16, split_tail=None),
         "GROUP_M 32": dict(block_n=bn, stages=st, group_m=32, split_tail=None),
         "no split tail": dict(block_n=bn, stages=st, group_m=GROUP_M, split_tail=False),
         "split tail always": dict(block_n=bn, stages=st, group_m=GROUP_M, split_tail=True),
         # each consumer warpgroup its own partition, releasing stages on its own (no 256-thread barrier a K step)
         "two consumer partitions": dict(block_n=bn, stages=st, group_m=GROUP_M, split_tail=None, split_wg=True)}
    if not swiglu:
        v["BN 128, 5 stages"] = dict(block_n=128, stages=5, group_m=GROUP_M, split_tail=None)
    else:
        v["BN 64x2, 6 stages"] = dict(block_n=64, stages=6, group_m=GROUP_M, split_tail=None)
    return v


def run_sweep(args: argparse.Namespace) -> Iterator[dict]:
    from bagel_kernels.routed_gemm_gluon import BLOCK_K, launch_routed_gemm_ws

    sets = {k: v for k, v in sweep_token_sets().items() if args.sets is None or k in args.sets}
    for routing, ids, (pname, n, k, swiglu), (p, w, x, bias, res, tf), shape in cases(sets):
        m = routing.num_tokens
        dense = tf(bench_ms(projection_peers(x, ids.bool(), w, swiglu, True, bias, res)["dense cuBLAS"], True))
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        want = None
        for vname, v in sweep_variants(swiglu).items():
            if args.variants is not None and vname != "shipped" and vname not in args.variants:
                continue
            def f(v: dict = v) -> torch.Tensor:
                return launch_routed_gemm_ws(x, w, out, bias, ids, swiglu, res, routing.segments,
                                             v["split_tail"], v["block_n"], BLOCK_K, v["stages"],
                                             group_m=v["group_m"], split_wg=v.get("split_wg", False))
            got = f().clone()
            want = got if want is None else want
            same = "same bits" if torch.equal(got, want) else "BITS DIFFER"
            yield row(f"routed GEMM exact (gluon) {vname} ({same})", shape, "TFLOP/s", tf(bench_ms(f, True)),
                      "dense cuBLAS", dense)
        yield row("peer dense cuBLAS", shape, "TFLOP/s", dense)


def run(args: argparse.Namespace) -> Iterator[dict]:
    graph = not args.no_graph
    exact = bk.KernelOptions(backend=args.backend)
    fast = bk.KernelOptions(backend=args.backend, mode="fast")
    for routing, ids, (pname, n, k, swiglu), (p, w, x, bias, res, tf), shape in cases(token_sets()):
        act = "swiglu" if swiglu else None
        peers = {name: tf(bench_ms(f, graph))
                 for name, f in projection_peers(x, ids.bool(), w, swiglu, graph, bias, res).items()}
        dense = peers["dense cuBLAS"]
        ours = tf(bench_ms(lambda: bk.routed_linear(x, routing, w, bias, activation=act, residual=res,
                                                    expert_ids=ids, options=exact), graph))
        ours_fast = tf(bench_ms(lambda: bk.routed_linear(x, routing, w, bias, activation=act, residual=res,
                                                         options=fast), graph))
        yield row(f"routed GEMM exact ({args.backend})", shape, "TFLOP/s", ours, "dense cuBLAS", dense)
        yield row("routed GEMM fast", shape, "TFLOP/s", ours_fast, "dense cuBLAS", dense)
        yield from [row(f"peer {name}", shape, "TFLOP/s", val) for name, val in peers.items()]


def run_fp8(args: argparse.Namespace) -> Iterator[dict]:
    """The FP8 routed GEMM at this benchmark's row sets (the generation step's 3 jobs, the img2img prefill)."""
    from . import bench_fp8_gemm

    fp8_args = bench_fp8_gemm.build_parser().parse_args([])  # every option run_rows reads, at its default
    for label, routing in token_sets().items():
        yield from bench_fp8_gemm.run_rows(fp8_args, label, routing)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    known = set(sweep_variants(False)) | set(sweep_variants(True))
    if args.variants is not None and set(args.variants) - known:
        raise SystemExit(f"bench_routed_gemm: unknown --variants {sorted(set(args.variants) - known)}; "
                         f"known: {sorted(known)}")
    sets = sweep_token_sets()
    if args.sets is not None and set(args.sets) - set(sets):
        raise SystemExit(f"bench_routed_gemm: unknown row sets {sorted(set(args.sets) - set(sets))}; "
                         f"known: {sorted(sets)}")
    require_cuda("bench_routed_gemm")
    if args.sweep and args.quantization != "none":
        raise SystemExit("bench_routed_gemm: --sweep times the exact bf16 kernel; for FP8 configs run "
                         "python -m benchmarks.bench_fp8_gemm --sweep")
    emit(run_fp8(args) if args.quantization == "fp8" else run_sweep(args) if args.sweep else run(args), args)


if __name__ == "__main__":
    main()
