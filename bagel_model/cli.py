"""``bagel-generate``: text-to-image with the thin BAGEL model (tiny preset by default, runs on a laptop CPU)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from bagel_kernels import KernelOptions

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bagel-generate",
        description="Generate an image from a prompt with the thin BAGEL-7B-MoT model. Without --checkpoint the "
                    "chosen preset gets seeded random weights (the image is noise-like, but exactly reproducible). "
                    "Same seed and settings give a byte-identical PNG and latent, run after run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", default="text2img", choices=["text2img", "img2img", "text2text", "img2text"],
                   help="what to generate: an image from text, an edited image, text from text, text about an image")
    p.add_argument("--image", default=None, help="input image (PNG/JPEG) for img2img and img2text; img2img keeps "
                   "its size (must be a multiple of 16 within the preset's latent grid)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="greedy decode budget of the AR stage (default 32 for text outputs, 0 for images)")
    p.add_argument("--split", action="store_true",
                   help="run the AR stage and the diffusion stage as two processes joined by a shared-memory KV "
                        "connector (image modes); the image is bit-identical to the single-stage run")
    p.add_argument("--kv-layout", default="flashinfer_nhd",
                   help="paged KV layout of the diffusion stage (the AR stage writes flash_attn); any of "
                        "flash_attn, flashinfer_nhd, flashinfer_hnd, separate, packed")
    p.add_argument("--config", default="tiny", help="embedded preset: tiny | bagel-7b-mot (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="BAGEL checkpoint directory in the released layout")
    p.add_argument("--prompt", default="a red cube", help="text prompt")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of random weights)")
    p.add_argument("--steps", type=int, default=None, help="timesteps (N-1 Euler steps); default from the config")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 16; text2img)")
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
    p.add_argument("--kernels", default="exact", choices=["exact", "fast"],
                   help="kernel mode: exact = batch-invariant kernels everywhere (bit-reproducible across parallel "
                        "layouts); fast = cuBLAS for some projections on CUDA, which CHANGES OUTPUT BITS (the md5s "
                        "differ from exact; no effect on CPU)")
    return p


def load_model(args):
    from .checkpoint import from_pretrained
    from .config import BagelConfig
    from .model import BagelModel
    from .tokenizer import BagelTokenizer

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if str(args.device).startswith("cuda") else torch.float32)
    kernels = KernelOptions(mode=args.kernels)
    if args.checkpoint:
        return from_pretrained(args.checkpoint, device=args.device, dtype=dtype, kernels=kernels)
    cfg = BagelConfig.preset(args.config)
    return (BagelModel.random(cfg, seed=args.seed, dtype=dtype, device=args.device, kernels=kernels),
            BagelTokenizer.from_directory(None))


# DESIGN.md: image editing uses its own CFG defaults
IMG2IMG_DEFAULTS = {"cfg_text_scale": 4.0, "cfg_img_scale": 2.0, "cfg_interval": (0.0, 1.0),
                    "cfg_renorm_type": "text_channel"}


def sampling_params(args, cfg, size: tuple[int, int] | None = None):
    """The preset's generation defaults (img2img's own for editing), overridden by whatever the command line gives."""
    from dataclasses import asdict

    from .denoise import SamplingParams

    p = asdict(cfg.generation)
    if getattr(args, "mode", "text2img") == "img2img":
        p.update(IMG2IMG_DEFAULTS)
    steps = p.pop("num_timesteps")
    overrides = {"cfg_text_scale": args.cfg_text_scale, "cfg_img_scale": args.cfg_img_scale,
                 "timestep_shift": args.timestep_shift, "cfg_renorm_type": args.cfg_renorm_type,
                 "cfg_interval": tuple(args.cfg_interval) if args.cfg_interval else None}
    p.update({k: v for k, v in overrides.items() if v is not None})
    h, w = size or (args.size, args.size)
    return SamplingParams(steps=args.steps if args.steps is not None else steps, seed=args.seed, height=h,
                          width=w, **p).validate()


def read_image(path: str) -> torch.Tensor:
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"input image not found: {path}")
    return torch.from_numpy(__import__("numpy").array(Image.open(path).convert("RGB")))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    from .pipeline import BagelPipeline
    from .stages import IMAGE_OUT, Request

    try:
        image = read_image(args.image) if args.image else None
        if args.mode in ("img2img", "img2text") and image is None:
            raise ValueError(f"--mode {args.mode} needs --image")
        max_tokens = args.max_tokens if args.max_tokens is not None else (0 if args.mode in IMAGE_OUT else 32)
        if args.split:
            from .split import ModelSpec, run_split_processes
            from .config import BagelConfig

            device = args.device
            dtype = args.dtype and str(DTYPES[args.dtype]).replace("torch.", "")
            spec = ModelSpec(preset=args.config, seed=args.seed, device=device, checkpoint=args.checkpoint,
                             dtype=dtype or ("bfloat16" if device.startswith("cuda") else "float32"), threads=args.threads,
                             kernels=KernelOptions(mode=args.kernels))
            cfg = BagelConfig.from_pretrained(args.checkpoint) if args.checkpoint else BagelConfig.preset(args.config)
            params = sampling_params(args, cfg, tuple(image.shape[:2]) if args.mode == "img2img" else None)
            req = Request(args.mode, args.prompt, params, image, max_tokens)
            res = run_split_processes(spec, req, layout1=args.kv_layout)
            s1 = res["stage1"]
            result_image, latent_md5, image_md5 = torch.from_numpy(s1["image"]), s1["latent_md5"], s1["image_md5"]
            text = res["stage0"]["text"]
        else:
            model, tok = load_model(args)
            params = sampling_params(args, model.cfg, tuple(image.shape[:2]) if args.mode == "img2img" else None)
            model.cfg.check_image_size(params.height, params.width)
            req = Request(args.mode, args.prompt, params, image, max_tokens)
            r0, r1 = BagelPipeline(model, tok).generate(req, kv_layout=args.kv_layout, progress=not args.no_progress)
            text = r0.text
            if r1 is not None:
                result_image, latent_md5, image_md5 = r1.image, r1.latent_md5, r1.image_md5
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"bagel-generate: error: {e}", file=sys.stderr)
        return 2
    if max_tokens:
        print(f"text: {text!r}")
    if args.mode in IMAGE_OUT:
        from PIL import Image

        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Image.fromarray(result_image.cpu().numpy()).save(args.out, format="PNG")
        print(f"latent md5 {latent_md5}")
        print(f"image  md5 {image_md5}")
        print(f"wrote {args.out} ({params.width}x{params.height}, {params.steps} steps, seed {params.seed}"
              f"{', split' if args.split else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
