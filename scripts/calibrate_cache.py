"""Calibrate step caching for a checkpoint: for each setting of a policy's knobs, generate the prompts cached and
uncached and print the time, the fraction of middle-layer job-steps reused, and the decoded images' PSNR and SSIM
against the uncached ones (scikit-image's metrics).

    python scripts/calibrate_cache.py --checkpoint /ckpt/BAGEL-7B-MoT --device cuda --policy dbcache \\
        --sweep threshold=0.12,0.24,0.4 --prompts-file prompts.txt
    python scripts/calibrate_cache.py --policy fixed --sweep interval=2,3,4   # tiny preset, CPU: a smoke run

Random weights (a preset) say nothing about image quality; only a real checkpoint does.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import fields, replace

import numpy as np
import torch

from bagel_model.core.sampling import CacheConfig


def image_metrics(ref: np.ndarray, img: np.ndarray) -> tuple[float, float]:
    """PSNR (dB; inf when equal) and SSIM of two (H, W, 3) uint8 images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if np.array_equal(ref, img):
        return float("inf"), 1.0
    psnr = peak_signal_noise_ratio(ref, img, data_range=255)
    side = min(ref.shape[0], ref.shape[1])
    win = min(7, side if side % 2 else side - 1)  # SSIM's window must fit small (tiny preset) images
    return float(psnr), float(structural_similarity(ref, img, channel_axis=2, data_range=255, win_size=win))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compare(pipe, prompts: list[str], configs: list[CacheConfig], seed: int = 0, sync=lambda: None,
            batch: bool = False, **call) -> list:
    """Uncached first (the reference), then each config; every prompt alone, or all of them as one batch
    (``batch``: seconds are then per batch). Returns one dict per config (the first is the uncached run) with
    seconds per image (or batch), reused fraction, latent error, PSNR and SSIM (means over the prompts)."""
    def run(cache):
        outs, secs = [], []
        groups = [prompts] if batch else [[p] for p in prompts]
        for g in groups:
            first = prompts.index(g[0])
            sync()
            t0 = time.perf_counter()
            o = pipe(g, seed=[seed + first + i for i in range(len(g))], cache=cache, output_type="np", **call)
            sync()
            secs.append(time.perf_counter() - t0)
            outs += [_one(o, i) for i in range(len(g))]
        return outs, float(np.mean(secs))

    ref, ref_s = run(CacheConfig())
    rows = [dict(config="uncached", seconds=ref_s, reused=0.0, latent_err=0.0, psnr=float("inf"), ssim=1.0)]
    for c in configs:
        outs, secs = run(c)
        psnr, ssim, err, reused = [], [], [], []
        for o, r in zip(outs, ref):
            a = np.round(o.images[0] * 255).astype(np.uint8)
            b = np.round(r.images[0] * 255).astype(np.uint8)
            p, s = image_metrics(b, a)
            psnr.append(p)
            ssim.append(s)
            err.append(relative_error(o.latents[0], r.latents[0]))
            st = o.cache_stats[0]
            reused.append(st["reused"] / max(1, st["computed"] + st["reused"]))
        rows.append(dict(config=describe(c), seconds=secs, reused=float(np.mean(reused)),
                         latent_err=float(np.mean(err)), psnr=float(np.mean(psnr)), ssim=float(np.mean(ssim))))
    return rows


def _one(out, i: int):
    """Request ``i`` of a pipeline output, as an output of one."""
    return type(out)(images=[out.images[i]], text=[out.text[i]], latents=[out.latents[i]],
                     latent_md5s=[out.latent_md5s[i]], image_md5s=[out.image_md5s[i]],
                     cache_stats=[out.cache_stats[i]])


def describe(c: CacheConfig) -> str:
    base = CacheConfig.named("taylorseer" if c.policy == "fixed" and c.taylor_order else c.policy)
    changed = [f"{f.name}={getattr(c, f.name)}" for f in fields(c) if getattr(c, f.name) != getattr(base, f.name)]
    name = "taylorseer" if base.taylor_order and c.policy == "fixed" else c.policy
    return name + (f" ({', '.join(changed)})" if changed else "")


def sweep_configs(policy: str, sweeps: list[str], taylor_order: int | None) -> list[CacheConfig]:
    """The cartesian product of ``knob=v1,v2,...`` over the policy's preset."""
    base = CacheConfig.named(policy)
    if taylor_order is not None:
        base = replace(base, taylor_order=taylor_order)
    names = {f.name: f.type for f in fields(CacheConfig)}
    axes = []
    for s in sweeps:
        knob, _, values = s.partition("=")
        if knob not in names or knob == "policy" or not values:
            raise ValueError(f"--sweep {s!r}: expected KNOB=v1,v2 with KNOB one of "
                             f"{sorted(n for n in names if n != 'policy')}")
        conv = float if knob == "threshold" else int
        axes.append([(knob, conv(v)) for v in values.split(",")])
    return [replace(base, **dict(combo)) for combo in itertools.product(*axes)] if axes else [base]


def main(argv: list[str] | None = None) -> int:
    from bagel_model.pipeline import BagelPipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="checkpoint directory or hub id (default: the --preset)")
    ap.add_argument("--preset", default="tiny", help="preset with random weights when no --checkpoint is given")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--policy", default="fixed", choices=["fixed", "dbcache", "taylorseer"], help="policy to calibrate")
    ap.add_argument("--sweep", nargs="*", default=[], metavar="KNOB=V1,V2",
                    help="knobs to sweep (cartesian product), e.g. threshold=0.12,0.24 interval=2,3")
    ap.add_argument("--taylor-order", type=int, default=None, help="override the preset's TaylorSeer order")
    ap.add_argument("--prompts-file", default=None, help="one prompt per line (default: two built-in prompts)")
    ap.add_argument("--size", type=int, default=None, help="image side (default: the model's largest)")
    ap.add_argument("--steps", type=int, default=None, help="timesteps (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first prompt (prompt i: seed + i)")
    args = ap.parse_args(argv)
    prompts = ["a red cube on a wooden table", "a lighthouse at dusk, oil painting"]
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    configs = sweep_configs(args.policy, args.sweep, args.taylor_order)
    pipe = (BagelPipeline.from_pretrained(args.checkpoint, device=args.device) if args.checkpoint
            else BagelPipeline.from_preset(args.preset, device=args.device))
    pipe.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    call = dict(height=args.size, width=args.size, num_inference_steps=args.steps)
    pipe(prompts[0], cache=configs[0], **{**call, "num_inference_steps": call["num_inference_steps"]})  # warm-up
    rows = compare(pipe, prompts, configs, args.seed, sync, **call)
    print(f"{'config':<44}{'s/image':>9}{'reused':>8}{'latent err':>12}{'PSNR dB':>9}{'SSIM':>7}")
    for r in rows:
        print(f"{r['config']:<44}{r['seconds']:>9.3f}{r['reused']:>8.0%}{r['latent_err']:>12.2e}{r['psnr']:>9.2f}"
              f"{r['ssim']:>7.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
