"""Issue #30's weight-scale question: one fp32 scale per output channel (shipped) or per 128 x 128 block
(DeepSeek-V3 / DeepGEMM style)? The weights' share of the FP8 error, measured apart from the activations'.

    python scripts/fp8_weight_granularity.py [--steps 50] [--seeds 2] [--cases fixture,tiny,outliers] [--json out.json]

Each MoT projection weight of both experts (q, k, v, o, gate, up, down) is replaced in place by its FP8
round trip — ``dequantize(quantize(w))`` with ``fp8_quant.quantize_channels`` or ``quantize_blocks`` — and the
model then runs exactly as the non-FP8 model does (fp32 on the CPU, activations not quantized), so the error
against the exact run of the same request is the weight quantization's alone. Cases and metrics as
``scripts/fp8_accuracy_report.py`` (the upstream tiny fixture's text2img and img2img, the ``tiny`` preset, and
``tiny`` with residual outlier channels), plus the weights' own relative round-trip error ``|w - deq| / |w|`` over
all projections.

The speed side needs no run: with per-channel scales the weight scale is a column factor of the epilogue
(``acc * xs[r] * ws[c]``), while a 128 x 128 block scale changes along K, so the GEMM must promote every 128-wide K
step (``fp8_accumulation="promoted"``: measured 1.18–1.45x slower than fast accumulation, benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bagel_kernels import fp8_quant as fq  # noqa: E402
from bagel_model.core.tokenizer import BagelTokenizer  # noqa: E402
from bagel_model.pipeline import BagelPipeline  # noqa: E402
from scripts.calibrate_cache import image_metrics, relative_error  # noqa: E402
from scripts.fp8_accuracy_report import CASES, PROMPT, _outlier_model, _run, parse_study_args  # noqa: E402

GRANULARITIES = ("channel", "block128")


def round_trip(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``w`` (N, K) through e4m3 and back, in fp32, with per-output-channel or 128 x 128 block scales."""
    if granularity == "channel":
        q, s = fq.quantize_channels(w)
        return fq.dequantize_channels(q, s)
    if granularity == "block128":
        q, s = fq.quantize_blocks(w)
        return fq.dequantize_blocks(q, s)
    raise ValueError(f"unknown weight granularity {granularity!r}; expected one of {GRANULARITIES}")


def quantize_weights_in_place(pipe: BagelPipeline, granularity: str) -> float:
    """Every MoT projection weight (both experts: the parameters of the model's quantizable expert packs, the set
    ``quantization="fp8"`` quantizes) replaced by its round trip; returns |w - deq| / |w| over all."""
    err2 = ref2 = 0.0
    with torch.no_grad():
        for pack in pipe.model._fp8_packs():
            for w in pack._params():
                wf = w.data.float()
                deq = round_trip(wf, granularity)
                err2 += float((deq - wf).square().sum())
                ref2 += float(wf.square().sum())
                w.data.copy_(deq.to(w.dtype))
    pipe.model.pack_experts()  # the packs are rebuilt from the edited weights
    return (err2 / ref2) ** 0.5


def _pipe_and_requests(case: str) -> tuple[BagelPipeline, dict]:
    from bagel_model.core.sampling import CacheConfig, SamplingParams
    from bagel_model.serving.stages import Request

    if case == "fixture":
        from scripts.fixture_modes_report import FIXTURE, load, requests

        ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
        return load(ref), requests(ref, 2, CacheConfig())
    if case == "tiny":
        pipe = BagelPipeline.from_preset("tiny")
    elif case == "outliers":
        pipe = BagelPipeline(_outlier_model(), BagelTokenizer.from_directory(None))
    else:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    return pipe, {"text2img": Request("text2img", PROMPT, SamplingParams(steps=2, seed=0, height=64, width=64))}


def report(steps: int, cases: tuple[str, ...], seeds: int) -> dict:
    rows: dict = {}
    for case in cases:
        exact, reqs0 = _pipe_and_requests(case)
        runs = [{k: dataclasses.replace(r, params=dataclasses.replace(r.params, steps=steps, seed=seed))
                 for k, r in reqs0.items()} for seed in range(seeds)]
        bases = [_run(exact, reqs) for reqs in runs]
        for gran in GRANULARITIES:
            pipe, _ = _pipe_and_requests(case)
            werr = quantize_weights_in_place(pipe, gran)
            for reqs, base in zip(runs, bases):
                for name, (r, _) in _run(pipe, reqs).items():
                    b = base[name][0]
                    psnr, _ = image_metrics(b.image.numpy(), r.image.numpy())
                    row = rows.setdefault(f"{case} {name} {gran}", dict(case=case, request=name, weights=gran,
                                                                        weight_rel_err=werr, per_seed=[]))
                    row["per_seed"].append(dict(final_latent_rel_err=relative_error(r.latent, b.latent), psnr_db=psnr))
    for row in rows.values():
        for m in ("final_latent_rel_err", "psnr_db"):
            row[m] = sum(d[m] for d in row["per_seed"]) / len(row["per_seed"])
    return rows


def main(argv: list[str] | None = None) -> int:
    args, cases = parse_study_args(argv, __doc__, seeds=2)
    t0 = time.time()
    rows = report(args.steps, cases, args.seeds)
    print(f"FP8 weight scales (weights only, activations exact) vs exact, {args.steps} steps, {args.seeds} seed(s), "
          f"CPU fp32, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'case':<20}{'weights':<10}{'weight rel err':>16}{'final-latent rel err':>22}{'PSNR dB':>10}")
    for v in rows.values():
        print(f"{v['case'] + ' ' + v['request']:<20}{v['weights']:<10}{v['weight_rel_err']:>16.3e}"
              f"{v['final_latent_rel_err']:>22.3e}{v['psnr_db']:>10.2f}")
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
