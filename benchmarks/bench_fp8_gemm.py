"""The FP8 routed GEMM (issue #30) on BAGEL-7B's projections at the generation step's rows — 1024²: M = 2 x 4098 + 4
= 8200, 512²: 2 x 1026 + 4 = 2056 (latents on the generation expert first, 4 marker rows on the understanding expert
last) — each with the model's epilogue (qkv + bias, o_proj and down + residual, gate_up SwiGLU). Ours is what the
model runs (``routed_gemm_fp8`` with the default options: the warp-specialized Gluon kernel on Hopper, fast
accumulation, 128 x 256 tiles), also timed with fp32 promotion every 128 K (``fp8_accumulation="promoted"``,
128 x 128 tiles) and as the Triton FP8 kernel (promoted), each against the peer with the same accumulation:

- ``torch._scaled_mm`` with the same scaling (e4m3 x e4m3, fp32 per-row x per-channel scales, bf16 out): ONE dense
  cuBLAS GEMM over all rows with the generation weight (the peer: what routing and the fused epilogue would cost if
  they cost nothing), with precise accumulation (``use_fast_accum=False``, the default) and fast accumulation; its
  bias in cuBLAS's epilogue, no residual / SwiGLU (those would add eager kernels);
- the bf16 routed GEMM of this project in exact mode (``routed_linear``: Gluon on Hopper);
- bf16 dense cuBLAS (``F.linear`` / ``addmm`` with the residual).

TFLOP/s = 2·M·N·K (× 2 parts for SwiGLU) / median time (CUDA-graph replay, ``common.bench_ms``; quantization of the
activations is not timed). ``--sweep`` also times a few other fixed configs of the Gluon FP8 kernel (any fixed config
keeps rows batch-invariant; the shipped one is ``fp8_gluon_config``) and, at every row set, the ragged last round
split across programs or kept whole (the same bits). ``--quick`` times ours against ``_scaled_mm`` fast-accum and the
bf16 exact routed GEMM only (issue #30's two ratios). Also prints, per shape, the FP8 output's
relative difference to the bf16 GEMM and to ``_scaled_mm`` (precise), and how torch's CUDA cast to e4m3 treats
out-of-range values. First, per row count, the standalone per-row quantizer (o_proj's and down's inputs) in GB/s
against a plain e4m3 cast (``quantizer_rows``), with its piece width swept and the variant that reads a row once
(held in registers).

    python -m benchmarks.bench_fp8_gemm [--parts quantizer,decode,gemm] [--sweep] [--quick] [--m-gen 8196 2052]
        [--all-shapes] [--no-csv]
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import triton

import bagel_kernels as bk
from bagel_kernels.fp8_quant import quantize_channels, quantize_rows
from bagel_kernels.fp8_quant_triton import quantize_rows_triton, quantizer_chunk
from bagel_kernels.routed_linear_fp8 import routed_gemm_fp8
from bagel_kernels.routed_gemm_fp8_gluon import (Fp8GluonConfig, _stages_that_fit, fp8_gluon_config,
                                                  routed_gemm_fp8_gluon)
from bagel_kernels.routed_gemm_fp8_triton import routed_gemm_fp8_triton

from .common import add_output_args, bench_ms, emit, require_cuda, row
from .shapes import EPILOGUE, PROJECTIONS, sweep_token_sets

M_GEN, M_MARKERS = 2 * 4098, 4


def bagel_step_routing(m_gen: int = M_GEN) -> bk.ExpertSegments:
    return bk.ExpertSegments(((0, m_gen, True), (m_gen, m_gen + M_MARKERS, False)))


def sweep_configs(n: int, k: int, swiglu: bool) -> dict[str, Fp8GluonConfig]:
    """Fixed alternatives to the shipped (fast-accumulation) Gluon config, each a candidate for ``fp8_gluon_config``:
    a 64-wide K step (the same wgmma sequence, so the same bits, with twice the ring stages in the same shared
    memory) and the promoted config's tile without promotion (the tile's cost apart from the promotion's)."""
    base = fp8_gluon_config(n, k, swiglu, promote=False)
    bk64 = replace(base, block_k=64, stages=_stages_that_fit(base.block_n, 2 if swiglu else 1, 64))
    promoted_tile = fp8_gluon_config(n, k, swiglu, promote=True)
    return {f"fast-acc, BK 64, {bk64.stages} stages": bk64,
            f"fast-acc, BN {promoted_tile.block_n}{'x2' if swiglu else ''}, {promoted_tile.stages} stages":
                replace(promoted_tile, promote=False)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cast_probe() -> str:
    """How this torch's CUDA cast to e4m3 treats out-of-range and non-finite values (the quantizers clamp first)."""
    v = torch.tensor([449.0, 480.0, 1000.0, float("inf"), float("nan"), 1.0625, 1.1875], device="cuda")
    return f"cuda cast {v.tolist()} -> {v.to(torch.float8_e4m3fn).float().tolist()}"


def token_sets(args: argparse.Namespace) -> dict[str, bk.ExpertSegments]:
    """The row sets timed: the generation step at each ``--m-gen``; with ``--all-shapes`` also issue #30's others
    (img2img's 3 jobs, its prefill with mixed routing) and an SP rank's share (``bench_routed_gemm``'s sets)."""
    sets = {f"step {m}+{M_MARKERS}": bagel_step_routing(m) for m in args.m_gen}
    if args.all_shapes:
        sets.update({k: v for k, v in sweep_token_sets().items() if not k.startswith("t2i ")})
    return sets


def run(args: argparse.Namespace) -> Iterator[dict]:
    print(cast_probe(), flush=True)
    parts = args.parts.split(",")
    if "quantizer" in parts:
        for m_gen in args.m_gen:
            yield from quantizer_rows(m_gen)
    if "decode" in parts:
        yield from decode_rows()
    if "gemm" in parts:
        for label, routing in token_sets(args).items():
            yield from run_rows(args, label, routing)


def decode_rows() -> Iterator[dict]:
    """Text decoding's GEMMs (one token, the understanding expert): the FP8 small-batch kernel against the bf16
    one in µs per call and GB/s of weight bytes (a decode GEMM streams its weight once), with a few other fixed
    (N tile, K step, warps, ring stages) configurations (``same bits`` checks the default's output); and decode's
    FP8 path as it runs (the standalone row quantizer, then the GEMM) against the bf16 GEMM."""
    from bagel_kernels.routed_gemm_fp8_small_batch import fp8_small_batch_tiles, routed_gemm_fp8_small_batch
    from bagel_kernels.routed_gemm_triton import routed_gemm_small_batch_triton

    torch.manual_seed(0)
    for pname, n, k, swiglu in PROJECTIONS:
        p = 2 if swiglu else 1
        w = torch.randn(2, p, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ids = torch.zeros(1, dtype=torch.int32, device="cuda")
        res = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) if EPILOGUE[pname] == "residual" else None
        wq, ws = quantize_channels(w)
        xq, xs = quantize_rows(x)
        shape = f"decode {pname} M=1 N={n * p} K={k}"
        us = lambda ms: ms * 1e3  # noqa: E731
        t_bf16 = us(bench_ms(lambda: routed_gemm_small_batch_triton(x, w, None, ids, swiglu, res)))
        want = routed_gemm_fp8_small_batch(xq, xs, wq, ws, None, ids, swiglu, res)
        t_fp8 = us(bench_ms(lambda: routed_gemm_fp8_small_batch(xq, xs, wq, ws, None, ids, swiglu, res)))
        t_quant = us(bench_ms(lambda: routed_gemm_fp8_small_batch(*quantize_rows_triton(x), wq, ws, None, ids, swiglu,
                                                                   res)))
        yield row("row quantizer + fp8 small-batch GEMM (decode's path)", shape, "us", t_quant,
                  "bf16 small-batch GEMM", t_bf16)
        _, bk0 = fp8_small_batch_tiles(n, k)
        gbs = lambda t, b: p * n * k * b / (t * 1e-6) / 1e9  # noqa: E731
        yield row(f"fp8 small-batch GEMM (BN 32, BK {bk0}, 4 warps)", shape, "us", t_fp8, "bf16 small-batch GEMM",
                  t_bf16)
        yield row(f"fp8 small-batch GEMM (BN 32, BK {bk0}, 4 warps)", shape, "weight GB/s", gbs(t_fp8, 1))
        yield row("bf16 small-batch GEMM", shape, "weight GB/s", gbs(t_bf16, 2))
        for block_n, block_k, warps, stages in ((32, 512, 8, 4), (16, 256, 4, 4), (32, 256, 4, 6), (32, 128, 4, 8),
                                                (32, 128, 4, 4)):
            def alt(block_n: int = block_n, block_k: int = block_k, warps: int = warps,
                    stages: int = stages) -> torch.Tensor:
                return routed_gemm_fp8_small_batch(xq, xs, wq, ws, None, ids, swiglu, res, block_n=block_n,
                                                   block_k=block_k, num_warps=warps, num_stages=stages)
            same = "same bits" if torch.equal(alt(), want) else "OTHER BITS"
            yield row(f"fp8 small-batch GEMM (BN {block_n}, BK {block_k}, {warps} warps, {stages} stages; {same})",
                      shape, "us", us(bench_ms(alt)), "bf16 small-batch GEMM", t_bf16)


def same_codes(got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> str:
    """Whether two (e4m3 codes, fp32 scales) quantizations are bit for bit equal, as a row label."""
    equal = torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1])
    return "same bits" if equal else "OTHER BITS"


def quantizer_rows(m_gen: int) -> Iterator[dict]:
    """The standalone per-row quantizer on the two inputs no producer quantizes (o_proj's: the attention output,
    K 3584; down's: the SwiGLU output, K 18944) at the step's rows, in GB/s (2 bytes read, 1 written per element,
    4 per row's scale), with its piece width swept (any width gives the same bits, checked); the peer is torch's
    plain bf16 -> e4m3 cast of the same tensor (no amax, no scale: the bandwidth floor of the job)."""
    m = m_gen + M_MARKERS
    for pname, k in (("o_proj input", 3584), ("down input", 18944)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        gbs = lambda ms: (3 * m * k + 4 * m) / (ms * 1e-3) / 1e9  # noqa: E731
        shape = f"{pname} M={m} K={k}"
        peer = gbs(bench_ms(lambda: x.to(torch.float8_e4m3fn)))
        want = quantize_rows_triton(x)
        yield row("per-row quantizer (triton), shipped", shape, "GB/s", gbs(bench_ms(lambda: quantize_rows_triton(x))),
                  "torch e4m3 cast", peer)
        for chunk in sorted({1024, 2048, 4096, 8192, triton.next_power_of_2(k)} - {quantizer_chunk(k)}):
            same = same_codes(quantize_rows_triton(x, chunk=chunk), want)
            yield row(f"per-row quantizer (triton), pieces of {chunk} ({same})", shape, "GB/s",
                      gbs(bench_ms(lambda c=chunk: quantize_rows_triton(x, chunk=c))), "torch e4m3 cast", peer)
        for warps in (None, 32):
            same = same_codes(quantize_rows_triton(x, resident=True, num_warps=warps), want)
            yield row(f"per-row quantizer (triton), row resident in registers{'' if warps is None else f', {warps} warps'}"
                      f" ({same})", shape, "GB/s",
                      gbs(bench_ms(lambda w=warps: quantize_rows_triton(x, resident=True, num_warps=w))),
                      "torch e4m3 cast", peer)
        yield row("peer torch e4m3 cast", shape, "GB/s", peer)


def run_rows(args: argparse.Namespace, label: str, routing: bk.ExpertSegments) -> Iterator[dict]:
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    m = routing.num_tokens
    ids = routing.expert_ids(dev)
    gen = ids == 1  # the rows the dense peers (the generation expert's weight) compute as the model does
    exact = bk.KernelOptions()
    ours_name = "fp8 routed GEMM (gluon)" if bk.resolve_backend(torch.device(dev)) == "triton" and \
        torch.cuda.get_device_capability()[0] == 9 else "fp8 routed GEMM (triton)"
    for pname, n, k, swiglu in PROJECTIONS:
        p = 2 if swiglu else 1
        act = "swiglu" if swiglu else None
        w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(m, k, device=dev, dtype=dt)
        bias = torch.randn(2, p, n, device=dev, dtype=dt) * 0.02 if EPILOGUE[pname] == "bias" else None
        res = torch.randn(m, n, device=dev, dtype=dt) if EPILOGUE[pname] == "residual" else None
        xq, xs = quantize_rows(x)
        wq, ws = quantize_channels(w)
        tf = lambda ms: 2 * m * n * k * p / (ms * 1e-3) / 1e12  # noqa: E731
        shape = f"{label} {pname}{' +' + EPILOGUE[pname] if EPILOGUE[pname] else ''} M={m} N={n * p} K={k}"

        def ours() -> torch.Tensor:
            return routed_gemm_fp8(xq, xs, routing, wq, ws, bias, activation=act, residual=res, expert_ids=ids)

        dense_wq = wq[1].reshape(p * n, k)
        sa, sb = xs[:, None], ws[1].reshape(1, p * n)
        dense_b = None if bias is None else bias[1].reshape(p * n)

        def scaled_mm(fast: bool) -> Callable[[], torch.Tensor]:
            return lambda: torch._scaled_mm(xq, dense_wq.t(), scale_a=sa, scale_b=sb, bias=dense_b, out_dtype=dt,
                                            use_fast_accum=fast)

        def bf16_routed() -> torch.Tensor:
            return bk.routed_linear(x, routing, w, bias, activation=act, residual=res, expert_ids=ids, options=exact)

        dense_w = w[1].reshape(p * n, k)
        if res is not None:
            def bf16_dense() -> torch.Tensor:
                return torch.addmm(res, x, dense_w.t())
        else:
            def bf16_dense() -> torch.Tensor:
                return F.linear(x, dense_w, dense_b)

        # accuracy at this shape (gen rows, GEMM part only where the epilogues differ)
        y8 = ours()
        if not swiglu and res is None:
            print(f"{shape}: |fp8 - bf16 GEMM| / |bf16| = {rel(y8[gen], bf16_dense()[gen]):.4g}, "
                  f"|fp8 - scaled_mm| / |scaled_mm| = {rel(y8[gen], scaled_mm(False)()[gen]):.4g}", flush=True)
        else:
            print(f"{shape}: |fp8 - bf16 routed| / |bf16 routed| = {rel(y8, bf16_routed()):.4g}", flush=True)

        def triton_fp8() -> torch.Tensor:
            return routed_gemm_fp8_triton(xq, xs, wq, ws, bias, ids, swiglu, res, dt)

        def promoted() -> torch.Tensor:
            return routed_gemm_fp8(xq, xs, routing, wq, ws, bias, activation=act, residual=res, expert_ids=ids,
                                   options=bk.KernelOptions(fp8_accumulation="promoted"))

        def gluon_with(cfg: Fp8GluonConfig | None, split: bool | None) -> torch.Tensor:
            """The Gluon kernel with another fixed config and/or ragged-last-round choice (``--sweep``)."""
            return routed_gemm_fp8_gluon(xq, xs, wq, ws, bias, ids, swiglu, res, dt, segments=routing.segments,
                                         config=cfg, split_tail=split)

        t_ours = tf(bench_ms(ours))
        t_smm_fast = tf(bench_ms(scaled_mm(True)))
        t_bf16 = tf(bench_ms(bf16_routed))
        yield row(ours_name, shape, "TFLOP/s", t_ours, "torch._scaled_mm rowwise fast-accum", t_smm_fast)
        yield row(ours_name, shape, "TFLOP/s", t_ours, "bf16 routed GEMM exact", t_bf16)
        if not args.quick:  # --quick: issue #30's two ratios above only
            t_smm = tf(bench_ms(scaled_mm(False)))
            y_promoted = promoted()
            print(f"{shape}: |fast-acc - promoted| / |promoted| = {rel(y8, y_promoted):.4g}", flush=True)
            promoted_name = ours_name.replace(")", ", promoted)")
            yield row(promoted_name, shape, "TFLOP/s", tf(bench_ms(promoted)), "torch._scaled_mm rowwise", t_smm)
            if ours_name.endswith("(gluon)"):
                print(f"{shape}: |triton promoted - gluon promoted| / |gluon promoted| = "
                      f"{rel(triton_fp8(), y_promoted):.4g}", flush=True)
                yield row("fp8 routed GEMM (triton, promoted)", shape, "TFLOP/s", tf(bench_ms(triton_fp8)),
                          "torch._scaled_mm rowwise", t_smm)
            t_dense = tf(bench_ms(bf16_dense))
            yield row(ours_name, shape, "TFLOP/s", t_ours, "bf16 dense cuBLAS", t_dense)
            yield row("peer torch._scaled_mm rowwise", shape, "TFLOP/s", t_smm)
            yield row("peer torch._scaled_mm rowwise fast-accum", shape, "TFLOP/s", t_smm_fast)
            yield row("bf16 routed GEMM exact", shape, "TFLOP/s", t_bf16, "bf16 dense cuBLAS", t_dense)
            yield row("peer bf16 dense cuBLAS", shape, "TFLOP/s", t_dense)
        yield from sweep_rows(args, label, shape, tf, t_smm_fast, y8, gluon_with, n, k, swiglu)


def sweep_rows(args: argparse.Namespace, label: str, shape: str, tf: Callable[[float], float], t_peer: float,
               y8: torch.Tensor, launch: Callable[[Fp8GluonConfig | None, bool | None], torch.Tensor], n: int, k: int,
               swiglu: bool) -> Iterator[dict]:
    """``--sweep``: the fixed alternative configs (``sweep_configs``) at the generation step's rows, and at every
    row set the ragged last round split or kept whole (``split_tail``) and the tile order's GROUP_M (same bits
    either way, so a launch may choose them from M), each checked against the shipped output's bits."""
    if not args.sweep:
        return
    alts = {name: (cfg, None) for name, cfg in sweep_configs(n, k, swiglu).items()} if label.startswith("step ") else {}
    alts.update({"ragged last round split": (None, True), "ragged last round whole": (None, False)})
    shipped = fp8_gluon_config(n, k, swiglu, promote=False)
    alts.update({f"GROUP_M {g}": (replace(shipped, group_m=g), None) for g in (4, 16, 32)})
    for name, (cfg, split) in alts.items():
        same = "same bits" if torch.equal(launch(cfg, split), y8) else "OTHER BITS"
        yield row(f"fp8 routed GEMM (gluon) {name} ({same})", shape, "TFLOP/s",
                  tf(bench_ms(lambda: launch(cfg, split))), "torch._scaled_mm rowwise fast-accum", t_peer)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_fp8_gemm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time a few other fixed tile configs")
    p.add_argument("--m-gen", type=int, nargs="+", default=[M_GEN, 2 * 1026],
                   help="generation-expert rows of the step (4 marker rows follow): 8196 = 1024² CFG, 2052 = 512²")
    p.add_argument("--parts", default="quantizer,gemm",
                   help="comma-separated: quantizer (the row quantizer's GB/s), decode (the small-batch GEMMs of text "
                        "decoding, FP8 vs bf16), gemm (the routed GEMMs)")
    p.add_argument("--quick", action="store_true",
                   help="time ours against torch._scaled_mm fast-accum and the bf16 exact routed GEMM only")
    p.add_argument("--all-shapes", action="store_true",
                   help="also img2img's step (3 x 4098 rows), its prefill (mixed routing) and SP shares (M/2, M/4)")
    return add_output_args(p)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_cuda("bench_fp8_gemm")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    emit(run(args), args)


if __name__ == "__main__":
    main()
