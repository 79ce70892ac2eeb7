"""``bagel-generate``: text-to-image with the thin BAGEL model (tiny preset by default, runs on a laptop CPU)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bagel-generate",
        description="Generate an image from a prompt with the thin BAGEL-7B-MoT model. Without --checkpoint the "
                    "chosen preset gets seeded random weights (the image is noise-like, but exactly reproducible). "
                    "Same seed and settings give a byte-identical PNG and latent, run after run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="tiny", help="embedded preset: tiny | bagel-7b-mot (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="BAGEL checkpoint directory in the released layout")
    p.add_argument("--prompt", default="a red cube", help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of random weights)")
    p.add_argument("--steps", type=int, default=None, help="timesteps (N-1 Euler steps); default from the config")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16)")
    p.add_argument("--out", default="out.png", help="output PNG path")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--cfg-text-scale", type=float, default=None)
    p.add_argument("--cfg-img-scale", type=float, default=None)
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"))
    p.add_argument("--cfg-renorm-type", default=None, choices=["global", "channel", "text_channel"])
    p.add_argument("--timestep-shift", type=float, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (fixed so reductions, and md5s, are reproducible)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def load_model(args):
    from .checkpoint import from_pretrained
    from .config import BagelConfig
    from .model import BagelModel
    from .tokenizer import BagelTokenizer

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    if args.checkpoint:
        return from_pretrained(args.checkpoint, device=args.device, dtype=dtype)
    cfg = BagelConfig.preset(args.config)
    return BagelModel.random(cfg, seed=args.seed, dtype=dtype, device=args.device), BagelTokenizer.from_directory(None)


def sampling_params(args, cfg):
    """The preset's generation defaults, overridden by whatever the command line gives."""
    from dataclasses import asdict

    from .denoise import SamplingParams

    p = asdict(cfg.generation)
    steps = p.pop("num_timesteps")
    overrides = {"cfg_text_scale": args.cfg_text_scale, "cfg_img_scale": args.cfg_img_scale,
                 "timestep_shift": args.timestep_shift, "cfg_renorm_type": args.cfg_renorm_type,
                 "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None}
    p.update({k: v for k, v in overrides.items() if v is not None})
    return SamplingParams(steps=args.steps if args.steps is not None else steps, seed=args.seed, height=args.size,
                          width=args.size, **p).validate()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from .pipeline import BagelPipeline

    try:
        model, tok = load_model(args)
        params = sampling_params(args, model.cfg)
        model.cfg.check_image_size(params.height, params.width)
        result = BagelPipeline(model, tok).text_to_image(args.prompt, params, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"bagel-generate: error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result.save_png(args.out)
    print(f"latent md5 {result.latent_md5}")
    print(f"image  md5 {result.image_md5}")
    print(f"wrote {args.out} ({params.width}x{params.height}, {params.steps} steps, seed {params.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
