"""How far the inexact modes move the upstream tiny fixture's images: each step-cache preset and FP8 (per-row
activation × per-channel weight scales), against this project's exact run of the same request.

    python scripts/fixture_modes_report.py [--steps 50] [--json out.json]

Loads ``tests/fixtures/bagel_upstream_tiny`` (upstream's own tiny checkpoint) as the parity report does and runs its
text-to-image and image-editing prompts at 64 x 64 with ``--steps`` timesteps (the fixture's golden cases have 5,
too few for a cache's warm-up). For each mode: the final latent's relative error and the decoded image's PSNR and
SSIM against the exact run. CPU, fp32: FP8 runs its reference kernels (the bits a GPU run gives too).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bagel_kernels import KernelOptions  # noqa: E402
from bagel_model.core.checkpoint import from_pretrained  # noqa: E402
from bagel_model.core.sampling import CacheConfig  # noqa: E402
from bagel_model.pipeline import BagelPipeline  # noqa: E402
from bagel_model.serving.stages import Request  # noqa: E402
from scripts.calibrate_cache import image_metrics, relative_error  # noqa: E402
from scripts.upstream_parity_report import FIXTURE, params_of  # noqa: E402


def load(ref: dict, quantization: str = "none") -> BagelPipeline:
    model, tok = from_pretrained(FIXTURE, byte_tokenizer=True, kernels=KernelOptions(quantization=quantization))
    return BagelPipeline(model, tok.with_special_ids(ref["meta"]["new_token_ids"]))


def requests(ref: dict, steps: int, cache: CacheConfig) -> dict[str, Request]:
    from dataclasses import replace

    ids = ref["meta"]["prompt_ids"]
    t2i = replace(params_of(ref["cases"]["t2i_cfg3"]), steps=steps, cache=cache)
    edit_case = ref["cases"]["edit_cfg3_64x64"]
    edit = replace(params_of(edit_case), steps=steps, cache=cache)
    return {"text2img": Request("text2img", "", t2i, prompt_ids=ids),
            "img2img": Request("img2img", "", edit, image=edit_case["input_image_uint8"], prompt_ids=ids)}


def run(pipe: BagelPipeline, reqs: dict[str, Request]) -> dict:
    return {name: pipe.generate(r)[1] for name, r in reqs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="timesteps per request")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
    exact_pipe = load(ref)
    base = run(exact_pipe, requests(ref, args.steps, CacheConfig()))
    modes = {name: (exact_pipe, CacheConfig.named(name)) for name in ("fixed", "dbcache", "taylorseer")}
    modes["fp8"] = (load(ref, "fp8"), CacheConfig())
    report = {}
    for mode, (pipe, cache) in modes.items():
        got = run(pipe, requests(ref, args.steps, cache))
        for case, r in got.items():
            psnr, ssim = image_metrics(base[case].image.numpy(), r.image.numpy())
            st = r.cache_stats
            report[f"{mode} {case}"] = dict(final_latent_rel_err=relative_error(r.latent, base[case].latent),
                                            psnr_db=psnr, ssim=ssim,
                                            reused=st["reused"] / max(1, st["computed"] + st["reused"]))
    print(f"{'mode':<22}{'final-latent rel err':>22}{'PSNR dB':>10}{'SSIM':>8}{'reused':>8}")
    for k, v in report.items():
        print(f"{k:<22}{v['final_latent_rel_err']:>22.3e}{v['psnr_db']:>10.2f}{v['ssim']:>8.4f}{v['reused']:>8.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
