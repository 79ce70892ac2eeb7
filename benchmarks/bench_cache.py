"""Step caching end to end through ``pipe(...)``: seconds per image of each cache preset against the uncached run
in the same process (the peer: ratio = its speedup), the fraction of middle-layer job-steps reused, and the error
against uncached — final-latent relative error, decoded-image PSNR and SSIM (``scripts/calibrate_cache.py``
computes them). Text-to-image at each size, image editing, and a batch of requests as one packed denoise.

    python -m benchmarks.bench_cache --preset bagel-7b-mot --device cuda --size 1024 --steps 50
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from bagel_model.core.sampling import CacheConfig
from bagel_model.pipeline import BagelPipeline
from scripts.calibrate_cache import compare

from .common import add_output_args, emit, row

PROMPTS = ["a photo of a red cube on a wooden table", "a lighthouse at dusk, oil painting",
           "two green cones on a beach", "a blue ball in the snow"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_cache", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, nargs="+", default=[64], help="text2img image sides in pixels")
    ap.add_argument("--steps", type=int, default=12, help="timesteps per request")
    ap.add_argument("--policies", nargs="+", default=["fixed", "dbcache", "taylorseer"],
                    choices=["fixed", "dbcache", "taylorseer"])
    ap.add_argument("--img2img", type=int, default=None, metavar="SIDE",
                    help="also edit a SIDE x SIDE image (default: no editing rows)")
    ap.add_argument("--batch", type=int, default=None, metavar="SIDE",
                    help="also run the four prompts as one batch at SIDE x SIDE (default: no batch rows)")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per text2img / img2img row (seconds: mean)")
    return add_output_args(ap)


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    pipe = BagelPipeline.from_preset(a.preset, device=a.device)
    pipe.set_progress_bar_config(disable=True)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    configs = [CacheConfig.named(p) for p in a.policies]
    for c in [CacheConfig()] + configs:  # warm-up: kernels compiled (and graphs recorded) for the timed layouts
        pipe(PROMPTS[0], height=a.size[0], width=a.size[0], num_inference_steps=c.warmup + 3, cache=c)
    cases = [(f"{s}² text2img", dict(height=s, width=s), PROMPTS[:a.prompts], False) for s in a.size]
    if a.img2img:
        img = (np.arange(a.img2img * a.img2img * 3) % 251).astype(np.uint8).reshape(a.img2img, a.img2img, 3)
        cases.append((f"{a.img2img}² img2img", dict(image=img), PROMPTS[:a.prompts], False))
    if a.batch:
        cases.append((f"4 x {a.batch}² text2img, one batch", dict(height=a.batch, width=a.batch), PROMPTS, True))
    for what, call, prompts, batch in cases:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        res = compare(pipe, prompts, configs, sync=sync, batch=batch, num_inference_steps=a.steps, **call)
        shape = f"{a.preset} {what}, {a.steps} steps"
        base = res[0]
        rows = [row("uncached", shape, "s/batch" if batch else "s/image", base["seconds"])]
        for r in res[1:]:
            rows += [row(f"step cache {r['config']}", shape, "s/batch" if batch else "s/image", r["seconds"],
                         "uncached", base["seconds"]),
                     row(f"step cache {r['config']}", shape, "reused fraction", round(r["reused"], 3)),
                     row(f"step cache {r['config']}", shape, "final-latent rel err", r["latent_err"]),
                     row(f"step cache {r['config']}", shape, "PSNR dB vs uncached", round(r["psnr"], 2)),
                     row(f"step cache {r['config']}", shape, "SSIM vs uncached", round(r["ssim"], 4))]
        if cuda:
            rows.append(row("step cache (all runs)", shape, "peak GiB", torch.cuda.max_memory_allocated() / 2**30))
        emit(rows, a)


if __name__ == "__main__":
    main()
