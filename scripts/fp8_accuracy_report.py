"""Issue #30's accuracy gate (CPU part): FP8 activation scaling per row (shipped) vs 1x128 groups vs per tensor (what
per-tensor FP8 deployments ship), weights per output channel in all three, each against the exact (non-FP8) run of
the same request with the same weights.

    python scripts/fp8_accuracy_report.py [--steps 50] [--seeds 1] [--cases fixture,tiny,outliers] [--json out.json]

Cases (CPU, fp32 activations; FP8 runs the plain-torch reference, ``KernelOptions.fp8_activation_scaling``):

- ``fixture``: the upstream tiny checkpoint (``tests/fixtures/bagel_upstream_tiny``), its text2img and img2img prompts
  at 64 x 64 (``scripts/fixture_modes_report.py``'s requests).
- ``tiny``: the ``tiny`` preset (random weights, seed 0), text2img 64 x 64.
- ``outliers``: the ``tiny`` preset with residual-stream outlier channels: the output rows (the hidden channels they
  write) ``OUTLIER_CHANNELS`` of every layer's o_proj and down_proj, both experts, multiplied by ``OUTLIER_SCALE``
  before quantization (the exact run uses the same scaled float weights), so those channels carry large values into
  every later projection's input, as in trained LLMs.

Per (case, scaling, request): the final latent's relative L2 error, the decoded image's PSNR against the exact run,
and the mean over steps 2..N of the per-step update's relative error ``|dx_fp8 - dx_exact| / |dx_exact|`` with
``dx = x_k - x_{k-1}`` (the Euler step, i.e. velocity times dt, which cancels; step 1 has no recorded x_0).
"Gate": per-row's mean latent error no worse than per-tensor's on every (case, request). e4m3 is a floating-point
format: any element within ~2^14 of its group's amax keeps 3 fraction bits whatever the granularity, so the
scalings differ mostly in rounding (scale = amax / 448 is not a power of two), and a single seed's ranking is noise;
``--seeds`` averages. The tiny models' K (96, 192) is at most 2 groups of 128: "group128" differs from "row" only
in down_proj there.

Measured 2026-12-07 (50 steps, 4 seeds, CPU): per-row meets the gate on the fixture (both requests) but not on
``tiny`` (within seed noise: 2/4 seeds) nor on ``outliers`` (per-tensor better on 4/4 seeds, ~0.57x the error). Per
GEMM, per-row is the more accurate there too (every projection's output error vs its float input, hooked in the
model: e.g. gate/up 2.0e-2 row vs 2.6e-2 tensor, 3 steps); an ablation (per-tensor on one projection kind only, 20
steps) puts the whole end-to-end gain on the fused QKV projection. A hypothesis, not checked: one grid for all tokens
rounds the token-constant outlier channels the same way in every key, a common-mode error softmax cancels, where
per-row grids differ per token. Not a CFG effect (cfg_text_scale 1 shows the same ranking).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bagel_kernels import KernelOptions  # noqa: E402
from bagel_model.core.config import BagelConfig  # noqa: E402
from bagel_model.core.model import BagelModel  # noqa: E402
from bagel_model.core.sampling import CacheConfig, SamplingParams  # noqa: E402
from bagel_model.core.tokenizer import BagelTokenizer  # noqa: E402
from bagel_model.pipeline import BagelPipeline  # noqa: E402
from bagel_model.serving.stages import Request  # noqa: E402
from scripts.calibrate_cache import image_metrics, relative_error  # noqa: E402

SCALINGS = ("row", "qkv_bound", "group128", "tensor")
CASES = ("fixture", "tiny", "outliers")
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_SCALE = 50.0
PROMPT = "a red cube on a wooden table"


def _run(pipe: BagelPipeline, reqs: dict[str, Request]) -> dict:
    """name -> (image result, [latent after each step])."""
    out = {}
    for name, r in reqs.items():
        steps: list[torch.Tensor] = []
        res = pipe.generate_batch([r], on_step=lambda i, k, t, x: steps.append(x.detach().float().clone()))[0][1]
        out[name] = (res, steps)
    return out


def _step_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    errs = []
    for k in range(1, min(len(a), len(b))):
        da, db = a[k] - a[k - 1], b[k] - b[k - 1]
        errs.append(float((da - db).norm() / db.norm().clamp_min(1e-30)))
    return sum(errs) / len(errs) if errs else float("nan")


def _outlier_model(seed: int = 0, fp8: bool = False) -> BagelModel:
    """The tiny preset's float weights with the outlier channels scaled; FP8: then quantized (``pack_experts``)."""
    model = BagelModel.random(BagelConfig.preset("tiny"), seed=seed)
    rows = list(OUTLIER_CHANNELS)
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            for path in ("self_attn.o_proj", "self_attn.o_proj_moe_gen", "mlp.down_proj", "mlp_moe_gen.down_proj"):
                w = layer.get_submodule(path).weight  # (hidden, in): a view of the float pack, written in place
                w.data[rows] *= OUTLIER_SCALE
    if fp8:
        model.kernels = dataclasses.replace(model.kernels, quantization="fp8")
        model.pack_experts()
    return model


def _pipes(case: str) -> tuple[BagelPipeline, BagelPipeline, dict[str, Request]]:
    """(exact pipe, FP8 pipe, requests) of one case; ``steps`` filled in by the caller."""
    if case == "fixture":
        from scripts.fixture_modes_report import FIXTURE, load, requests

        ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
        return load(ref), load(ref, "fp8"), requests(ref, 2, CacheConfig())
    if case == "tiny":
        exact, fp8 = BagelPipeline.from_preset("tiny"), BagelPipeline.from_preset("tiny", quantization="fp8")
    elif case == "outliers":
        tok = BagelTokenizer.from_directory(None)
        exact, fp8 = BagelPipeline(_outlier_model(), tok), BagelPipeline(_outlier_model(fp8=True), tok)
    else:
        raise ValueError(f"unknown case {case!r}; expected one of {CASES}")
    params = SamplingParams(steps=2, seed=0, height=64, width=64)
    return exact, fp8, {"text2img": Request("text2img", PROMPT, params)}


def report(steps: int, cases: tuple[str, ...] = CASES, seeds: int = 1) -> dict:
    """One row per (case, request, scaling): each metric's mean over ``seeds`` noise seeds (0 .. seeds-1), with the
    per-seed values under ``per_seed``."""
    rows = {}
    for case in cases:
        exact, fp8, reqs0 = _pipes(case)
        for seed in range(seeds):
            reqs = {k: dataclasses.replace(r, params=dataclasses.replace(r.params, steps=steps, seed=seed))
                    for k, r in reqs0.items()}
            base = _run(exact, reqs)
            for scaling in SCALINGS:
                fp8.model.kernels = dataclasses.replace(fp8.model.kernels, fp8_activation_scaling=scaling)
                got = _run(fp8, reqs)
                for name, (r, traj) in got.items():
                    b, btraj = base[name]
                    psnr, _ = image_metrics(b.image.numpy(), r.image.numpy())
                    row = rows.setdefault(f"{case} {name} {scaling}",
                                          dict(case=case, request=name, scaling=scaling, per_seed=[]))
                    row["per_seed"].append(dict(seed=seed, final_latent_rel_err=relative_error(r.latent, b.latent),
                                                psnr_db=psnr, mean_step_rel_err=_step_err(traj, btraj)))
    for row in rows.values():
        for m in ("final_latent_rel_err", "psnr_db", "mean_step_rel_err"):
            row[m] = sum(d[m] for d in row["per_seed"]) / len(row["per_seed"])
    return rows


def gate(rows: dict) -> dict:
    """Per (case, request): the best scaling by latent error, and whether the shipped scaling (the default of
    ``KernelOptions.fp8_activation_scaling``) is no worse than per-tensor."""
    shipped = KernelOptions().fp8_activation_scaling
    out = {}
    for key in {(v["case"], v["request"]) for v in rows.values()}:
        name = f"{key[0]} {key[1]}"
        errs = {s: rows[f"{name} {s}"]["final_latent_rel_err"] for s in SCALINGS if f"{name} {s}" in rows}
        per = [(a["final_latent_rel_err"], b["final_latent_rel_err"])
               for a, b in zip(rows[f"{name} {shipped}"]["per_seed"], rows[f"{name} tensor"]["per_seed"])]
        out[name] = dict(best=min(errs, key=errs.get), shipped=shipped,
                         shipped_no_worse_than_tensor=errs[shipped] <= errs["tensor"],
                         shipped_wins_vs_tensor=f"{sum(a <= b for a, b in per)}/{len(per)} seeds")
    return dict(sorted(out.items()))


def parse_study_args(argv: list[str] | None, description: str,
                     seeds: int = 1) -> tuple[argparse.Namespace, tuple[str, ...]]:
    """The FP8 studies' command line (this script's and ``fp8_weight_granularity``'s): steps, cases, seeds, json."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="timesteps per request")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--seeds", type=int, default=seeds, help="noise seeds per request (metrics are their means)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    cases = tuple(c for c in args.cases.split(",") if c)
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}; expected some of {CASES}")
    torch.set_num_threads(1)
    return args, cases


def main(argv: list[str] | None = None) -> int:
    args, cases = parse_study_args(argv, __doc__)
    t0 = time.time()
    rows = report(args.steps, cases, args.seeds)
    verdict = gate(rows)
    cpu = platform.processor() or platform.machine()
    print(f"FP8 activation scaling vs exact, {args.steps} steps, {args.seeds} seed(s), CPU fp32 ({cpu},"
          f" torch {torch.__version__}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"{'case':<20}{'scaling':<10}{'final-latent rel err':>22}{'PSNR dB':>10}{'mean step rel err':>19}")
    for v in rows.values():
        print(f"{v['case'] + ' ' + v['request']:<20}{v['scaling']:<10}{v['final_latent_rel_err']:>22.3e}"
              f"{v['psnr_db']:>10.2f}{v['mean_step_rel_err']:>19.3e}")
    for k, v in verdict.items():
        print(f"{k}: best {v['best']}; shipped ({v['shipped']}) no worse than per-tensor: "
              f"{v['shipped_no_worse_than_tensor']} (per seed: <= tensor on {v['shipped_wins_vs_tensor']})")
    print(f"({time.time() - t0:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(steps=args.steps, rows=rows, gate=verdict), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
