"""``bagel-generate``: a thin command-line shell over ``BagelPipeline`` (tiny preset by default, runs on a laptop
CPU). Its requests are made by ``pipeline.make_requests`` and its defaults are ``core.sampling.resolve_sampling``'s,
which ``--help`` prints."""
from __future__ import annotations

import argparse
import os
import sys

import torch

from bagel_kernels import KernelOptions

from .pipeline import DTYPES


class DefaultsFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after every help text that does not already say what its default is, and never
    ``(default: None)``: an option whose default is computed must say so in its own words."""

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or any(action.default is x for x in (None, False, argparse.SUPPRESS)) or action.nargs == 0:
            return h
        return h + " (default: %(default)s)"


def _defaults_help(key: str, what: str) -> str:
    """``what`` followed by the resolver's default of ``key`` for each preset and image mode."""
    from .core.config import PRESETS, BagelConfig
    from .core.sampling import resolve_sampling

    def fmt(v):
        return f"{v[0]} {v[1]}" if isinstance(v, tuple) else str(v)

    parts = []
    for name in PRESETS:
        cfg = BagelConfig.preset(name)
        t2i = getattr(resolve_sampling(cfg, "text2img"), key)
        i2i = getattr(resolve_sampling(cfg, "img2img"), key)
        parts.append(f"{name}: {fmt(t2i)}" + (f" (img2img {fmt(i2i)})" if i2i != t2i else ""))
    return f"{what} (default: the model's; presets: {'; '.join(parts)})"


_CACHE_KNOBS = (  # (flag after --cache-, CacheConfig field, type, help)
    ("front", "front", int, "first layers always computed (Fn)"),
    ("back", "back", int, "last layers always computed (Bn)"),
    ("warmup", "warmup", int, "first steps of a request always computed"),
    ("tail", "tail", int, "fixed: last steps always computed"),
    ("interval", "interval", int, "fixed: compute every N-th step after the warm-up"),
    ("threshold", "threshold", float, "dbcache: reuse while the front residual's relative L1 change is below this"),
    ("max-run", "max_cached_run", int, "dbcache: at most this many reused steps in a row"),
    ("taylor-order", "taylor_order", int, "TaylorSeer order of the reused residual's extrapolation (0: plain reuse)"))


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """``--cache`` and its ``--cache-*`` knobs (bagel-generate and bagel-sweep); each knob's dest is
    ``cache_<field>``."""
    from .core.sampling import CACHE_PRESETS, CacheConfig

    p.add_argument("--cache", default="none", choices=list(CACHE_PRESETS),
                   help="step caching of the denoiser: skip the middle layers of a job on steps where they barely "
                        "change (fixed: a schedule known ahead; dbcache: decided from the first layers' change; "
                        "taylorseer: fixed + first-order extrapolation). Changes output bits (its own exactness "
                        "class); none: every bit as without")
    fixed, dbcache = CacheConfig.named("fixed"), CacheConfig.named("dbcache")
    for flag, field, typ, what in _CACHE_KNOBS:
        p.add_argument(f"--cache-{flag}", dest=f"cache_{field}", metavar=flag.upper().replace("-", "_"), type=typ,
                       default=None,
                       help=f"{what} (default: the preset's; {field} {getattr(fixed, field)} for fixed, "
                            f"{getattr(dbcache, field)} for dbcache)")


def cache_from_args(args):
    """The ``CacheConfig`` the command line asks for: the preset with the given knobs replaced."""
    from dataclasses import replace

    from .core.sampling import CacheConfig

    knobs = {field: getattr(args, f"cache_{field}") for _, field, _, _ in _CACHE_KNOBS}
    knobs = {k: v for k, v in knobs.items() if v is not None}
    if knobs and args.cache == "none":
        raise ValueError(f"--cache-* options ({', '.join(sorted(knobs))}) need --cache fixed, dbcache or taylorseer")
    return replace(CacheConfig.named(args.cache), **knobs)


def build_parser() -> argparse.ArgumentParser:
    from bagel_kernels import LAYOUTS

    from .core.config import PRESETS
    p = argparse.ArgumentParser(
        prog="bagel-generate",
        description="Generate an image from a prompt with the thin BAGEL-7B-MoT model. Without --checkpoint the "
                    "chosen preset gets seeded random weights (the image is noise-like, but exactly reproducible). "
                    "Same seeds and settings give a byte-identical PNG and latent, run after run.",
        formatter_class=DefaultsFormatter)
    p.add_argument("--mode", default="text2img", choices=["text2img", "img2img", "text2text", "img2text"],
                   help="what to generate: an image from text, an edited image, text from text, text about an image")
    p.add_argument("--image", default=None, help="input image (any format PIL reads; EXIF orientation applied, "
                   "transparency over white) for img2img and img2text, which only they accept; any size: resized "
                   "like upstream BAGEL (aspect kept, to the model's latent grid; img2img outputs that size)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="greedy decode budget of the AR stage (default: 32 for text outputs, 0 for images)")
    p.add_argument("--split", action="store_true",
                   help="run the AR stage and the diffusion stage as two processes joined by a KV connector (CUDA "
                        "IPC of the KV tensors on a GPU, shared memory on CPU; image modes); the image is "
                        "bit-identical to the single-stage run")
    p.add_argument("--kv-layout", default=None, choices=list(LAYOUTS),
                   help="with --split: the paged KV layout the diffusion stage installs the received KV into (the AR "
                        "stage writes flash_attn; default: flashinfer_nhd)")
    p.add_argument("--config", default="tiny", choices=list(PRESETS),
                   help="embedded preset (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="BAGEL checkpoint in the released layout: a directory, or a "
                   "hub id such as ByteDance-Seed/BAGEL-7B-MoT resolved through the Hugging Face cache "
                   "(HF_HUB_OFFLINE=1: the cache only) (default: none: the preset with seeded random weights)")
    p.add_argument("--byte-tokenizer", action="store_true",
                   help="with --checkpoint: accept a directory without tokenizer.json and use the built-in "
                        "byte-level tokenizer (right only for checkpoints trained with it, e.g. saved tiny ones)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="a red cube", help="text prompt")
    prompt.add_argument("--prompts-file", default=None, metavar="FILE",
                   help="a batch: one prompt per line (blank lines skipped), generated together — every denoise step "
                        "packs all requests' CFG jobs into one forward — each bit-identical to its run alone; request "
                        "i gets seed --seed + i and writes --out with '-i' before the suffix (text2img, text2text)")
    prompt.add_argument("--prompt-ids", type=int, nargs="+", default=None, metavar="ID",
                   help="the prompt as token ids instead of --prompt (e.g. for a checkpoint without tokenizer files); "
                        "the chat markers are added as for text")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (and of img2img's VAE "
                   "sampling), 0 <= seed < 2**64")
    p.add_argument("--weights-seed", type=int, default=0,
                   help="seed of the preset's random weights (without --checkpoint): vary --seed for another image "
                        "from the same model, this for another model")
    p.add_argument("--steps", type=int, default=None,
                   help=_defaults_help("steps", "timesteps (N-1 Euler steps), >= 2"))
    p.add_argument("--size", type=int, default=None,
                   help=_defaults_help("height", "text2img image side in pixels, a multiple of 16; img2img takes the "
                                       "input image's size and refuses --size"))
    p.add_argument("--out", default="out.png", help="output image path; the format follows the suffix (.png, "
                   ".jpg, .webp, ...); checked for writability before generating")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--cfg-text-scale", type=float, default=None,
                   help=_defaults_help("cfg_text_scale", "classifier-free guidance scale of the text condition (> 1 "
                                  "enables the text branch)"))
    p.add_argument("--cfg-img-scale", type=float, default=None,
                   help=_defaults_help("cfg_img_scale", "guidance scale of the image condition (> 1 enables the image "
                                       "branch)"))
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help=_defaults_help("cfg_interval", "guidance applies only for timesteps t with LO < t <= HI"))
    p.add_argument("--cfg-renorm-type", default=None, choices=["global", "channel", "text_channel"],
                   help=_defaults_help("cfg_renorm_type", "how the guided velocity's norm is renormalized"))
    p.add_argument("--cfg-renorm-min", type=float, default=None,
                   help=_defaults_help("cfg_renorm_min", "lower clamp of the renormalization factor"))
    p.add_argument("--timestep-shift", type=float, default=None,
                   help=_defaults_help("timestep_shift", "shift s of the schedule t -> s*t/(1+(s-1)*t), > 0"))
    add_cache_args(p)
    p.add_argument("--threads", type=int, default=1, help="CPU threads, >= 1 (fixed so reductions, and md5s, are "
                   "reproducible)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--kernels", default="exact", choices=["exact", "fast"],
                   help="kernel mode: exact = batch-invariant kernels everywhere (bit-reproducible across parallel "
                        "layouts); fast = cuBLAS for some projections on CUDA, which CHANGES OUTPUT BITS (the md5s "
                        "differ from exact; no effect on CPU)")
    p.add_argument("--quantization", default="none", choices=["none", "fp8"],
                   help="fp8: MoT projections with float8_e4m3fn weights (per-channel scales) and e4m3 "
                        "activations (see --fp8-activation-scaling): its own exactness class, OTHER OUTPUT BITS "
                        "than none (CUDA: compute capability >= 8.9)")
    p.add_argument("--fp8-activation-scaling", default="qkv_bound",
                   choices=["qkv_bound", "row", "tensor", "group128"],
                   help="with --quantization fp8: how activations are scaled. qkv_bound = the QKV input with its "
                        "RMSNorm's static bound, the rest per row (batch-invariant; the most accurate in "
                        "benchmarks/RESULTS.md); row = every input per row (batch-invariant); tensor = one scale "
                        "per launch (what per-tensor FP8 ships; NOT batch-invariant: a batched request's bits "
                        "depend on its neighbours); group128 = 1x128 groups (CPU reference only). Each gives "
                        "OTHER OUTPUT BITS")
    p.add_argument("--fp8-accumulation", default="fast", choices=["fast", "promoted"],
                   help="with --quantization fp8 on a GPU: fast = the whole K loop in the tensor core's accumulator "
                        "(as FP8 serving stacks do); promoted = an fp32 add after every 128-wide K step "
                        "(DeepSeek-V3's scheme), slower, OTHER OUTPUT BITS (no effect on CPU)")
    return p


def check_args(args) -> None:
    """Everything the command line alone can get wrong, before any model is built: a clear error naming it."""
    import math

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for name in ("seed", "weights_seed"):
        v = getattr(args, name)
        if not 0 <= v < 2**64:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 2**64), got {v}")
    if args.image is not None and args.mode not in ("img2img", "img2text"):
        raise ValueError(f"--image is for --mode img2img or img2text; --mode {args.mode} would ignore it")
    if args.size is not None and args.mode != "text2img":
        raise ValueError(f"--size is for --mode text2img; {args.mode} "
                         + ("takes the input image's size" if args.mode == "img2img" else "makes no image"))
    if args.max_tokens is not None and args.max_tokens < 0:
        raise ValueError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    for name in ("cfg_text_scale", "cfg_img_scale", "cfg_renorm_min", "timestep_shift"):
        v = getattr(args, name)
        if v is not None and not math.isfinite(v):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number, got {v}")
    if args.cfg_interval is not None and not all(math.isfinite(v) for v in args.cfg_interval):
        raise ValueError(f"--cfg-interval must be finite numbers, got {args.cfg_interval}")
    if args.byte_tokenizer and not args.checkpoint:
        raise ValueError("--byte-tokenizer is for --checkpoint directories (presets always use it)")
    if args.kv_layout is not None and not args.split:
        raise ValueError("--kv-layout is the diffusion stage's layout under --split; without --split the contexts "
                         "stay where the prefill wrote them")
    from .pipeline import check_device

    try:
        check_device(args.device)
    except ValueError as e:
        raise ValueError(f"--{e}") from None  # "device X: why" -> "--device X: why"


def check_positions(cfg, n_prompt: int, mode: str, max_tokens: int) -> None:
    """The request's RoPE positions must stay within the model's (text: one per token; an image block: one)."""
    n = n_prompt + max_tokens + {"text2img": 1, "img2img": 3, "text2text": 0, "img2text": 1}[mode] + 1
    limit = cfg.llm.max_position_embeddings
    if n > limit:
        raise ValueError(f"the prompt ({n_prompt} tokens) plus --max-tokens {max_tokens} and the image blocks need "
                         f"{n} positions; {cfg.name} has {limit}")


def load_pipeline(args):
    """The pipeline of ``--checkpoint`` (a directory or a hub id) or of the ``--config`` preset with
    ``--weights-seed``."""
    from .pipeline import BagelPipeline

    kernels = KernelOptions(mode=args.kernels, quantization=args.quantization,
                            fp8_accumulation=args.fp8_accumulation,
                            fp8_activation_scaling=args.fp8_activation_scaling)
    if args.checkpoint:
        return BagelPipeline.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype, kernels=kernels,
                                             byte_tokenizer=args.byte_tokenizer)
    return BagelPipeline.from_preset(args.config, device=args.device, dtype=args.dtype, kernels=kernels,
                                     weights_seed=args.weights_seed)


def request_args(args) -> dict:
    """The sampling parameters the command line gives (None: not given, the resolver's default)."""
    cache = cache_from_args(args)
    return dict(steps=args.steps, height=args.size, width=args.size, cache=cache if cache.enabled else None,
                cfg_text_scale=args.cfg_text_scale,
                cfg_img_scale=args.cfg_img_scale, cfg_renorm_min=args.cfg_renorm_min,
                cfg_interval=tuple(args.cfg_interval) if args.cfg_interval else None,
                cfg_renorm_type=args.cfg_renorm_type, timestep_shift=args.timestep_shift)


def file_md5(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's usage errors (2) and --help (0): an exit code, as every other error
        return int(e.code or 0)
    from .core.checkpoint import CheckpointError
    from .core.image_io import ImageFileError, check_writable, read_image, write_image
    from .core.memory import InsufficientMemoryError
    from .pipeline import make_requests
    from .serving.stages import IMAGE_OUT

    try:
        check_args(args)
        torch.set_num_threads(args.threads)
        if args.prompts_file:
            return _run_batch(args)
        if args.mode in IMAGE_OUT:
            check_writable(args.out)  # before the generation, not after it
        image = read_image(args.image) if args.image else None
        if args.mode in ("img2img", "img2text") and image is None:
            raise ValueError(f"--mode {args.mode} needs --image")
        prompt = [] if args.prompt_ids is not None else [args.prompt]
        if args.split:
            text, result_image, latent_md5, image_md5, params = _run_split(args, prompt, image)
            stats = {"computed": 0, "reused": 0}
        else:
            pipe = load_pipeline(args)
            pipe.set_progress_bar_config(disable=args.no_progress)
            (req,) = make_requests(pipe.model.cfg, prompt, args.mode, images=[image] if image is not None else None,
                                   seeds=[args.seed], max_new_tokens=args.max_tokens, prompt_ids=args.prompt_ids,
                                   **request_args(args))
            check_positions(pipe.model.cfg, _prompt_tokens(pipe.tokenizer, req), args.mode, req.max_tokens)
            r0, r1 = pipe.generate(req, progress=not args.no_progress)
            text, params = r0.text, req.params
            if r1 is not None:
                result_image, latent_md5, image_md5, stats = r1.image, r1.latent_md5, r1.image_md5, r1.cache_stats
        if args.mode in IMAGE_OUT:
            write_image(result_image, args.out)
    except (ValueError, FileNotFoundError, TypeError, InsufficientMemoryError, CheckpointError, ImageFileError,
            RuntimeError) as e:
        print(f"bagel-generate: error: {e}", file=sys.stderr)
        return 2
    if args.max_tokens or (args.max_tokens is None and args.mode not in IMAGE_OUT):  # text was decoded
        print(f"text: {text!r}")
    if args.mode in IMAGE_OUT:
        print(f"latent md5 {latent_md5}  (final fp32 latent tensor)")
        print(f"pixels md5 {image_md5}  (decoded uint8 HxWx3 tensor)")
        print(f"file   md5 {file_md5(args.out)}  ({args.out}, as md5sum prints it)")
        print(f"wrote {args.out} ({params.width}x{params.height}, {params.steps} steps, seed {params.seed}"
              f"{', split' if args.split else ''})")
        if params.cache.enabled:
            print(cache_line(stats))
    return 0


def cache_line(stats: dict) -> str:
    n = stats["computed"] + stats["reused"]
    return (f"step cache: middle layers ran on {stats['computed']} of {n} job-steps, reused on {stats['reused']} "
            f"({stats['reused'] / max(n, 1):.0%})")


def _prompt_tokens(tok, req) -> int:
    return len(tok.wrap_prompt_ids(req.prompt_ids) if req.prompt_ids is not None else tok.encode_prompt(req.prompt))


def _run_split(args, prompt: list[str], image):
    """``--split``: the request made as the pipeline makes it, run by two stage processes (each loads the model)."""
    from .core.config import BagelConfig
    from .core.memory import check_fits
    from .core.tokenizer import BagelTokenizer
    from .pipeline import make_requests, resolve_dtype
    from .serving.split import ModelSpec, run_split_processes

    if args.checkpoint and not os.path.isdir(args.checkpoint):
        from .core.hub import looks_like_hub_id, resolve_hub_id

        if looks_like_hub_id(args.checkpoint):  # both stage processes load the resolved snapshot directory
            args.checkpoint = resolve_hub_id(args.checkpoint)
    dtype = resolve_dtype(args.dtype, args.device)
    spec = ModelSpec(preset=args.config, seed=args.weights_seed, device=args.device, checkpoint=args.checkpoint,
                     dtype=str(dtype).replace("torch.", ""), threads=args.threads, byte_tokenizer=args.byte_tokenizer,
                     kernels=KernelOptions(mode=args.kernels, quantization=args.quantization,
                                           fp8_accumulation=args.fp8_accumulation,
                                           fp8_activation_scaling=args.fp8_activation_scaling))
    cfg = BagelConfig.from_pretrained(args.checkpoint) if args.checkpoint else BagelConfig.preset(args.config)
    if not args.checkpoint:
        check_fits(cfg, dtype, args.device, copies=2)  # one model per stage process
    (req,) = make_requests(cfg, prompt, args.mode, images=[image] if image is not None else None, seeds=[args.seed],
                           max_new_tokens=args.max_tokens, prompt_ids=args.prompt_ids, **request_args(args))
    tok = BagelTokenizer.from_directory(args.checkpoint, byte_fallback=args.byte_tokenizer or not args.checkpoint)
    check_positions(cfg, _prompt_tokens(tok, req), args.mode, req.max_tokens)
    res = run_split_processes(spec, req, layout1=args.kv_layout or "flashinfer_nhd")
    s1 = res["stage1"]
    if "error" in res["stage0"]:  # the image is complete (stage 1 held a verified KV); stage 0's text is not
        print(f"bagel-generate: warning: stage 0 failed after handing over its KV ({res['stage0']['error']}); "
              "the image is complete, the decoded text is lost", file=sys.stderr)
    return res["stage0"]["text"], torch.from_numpy(s1["image"]), s1["latent_md5"], s1["image_md5"], req.params


def batch_out_path(out: str, i: int) -> str:
    """``out.png`` -> ``out-3.png`` for request 3 of a batch."""
    stem, ext = os.path.splitext(out)
    return f"{stem}-{i}{ext}"


def read_prompts(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--prompts-file {path!r} cannot be read: {e}") from None
    if not prompts:
        raise ValueError(f"--prompts-file {path!r} holds no prompt (one per line)")
    return prompts


def _run_batch(args) -> int:
    """``--prompts-file``: every prompt as one request of one batched generation (``BagelPipeline.generate_batch``);
    request i gets seed --seed + i."""
    from .core.image_io import check_writable, write_image
    from .pipeline import make_requests
    from .serving.stages import IMAGE_OUT

    if args.mode not in ("text2img", "text2text"):
        raise ValueError(f"--prompts-file runs text2img or text2text batches, not --mode {args.mode}")
    if args.split:
        raise ValueError("--prompts-file cannot be combined with --split")
    prompts = read_prompts(args.prompts_file)
    if args.seed + len(prompts) > 2**64:
        raise ValueError(f"--seed {args.seed} + {len(prompts)} requests leaves [0, 2**64)")
    outs = [batch_out_path(args.out, i) for i in range(len(prompts))] if args.mode in IMAGE_OUT else []
    for o in outs:
        check_writable(o)
    pipe = load_pipeline(args)
    reqs = make_requests(pipe.model.cfg, prompts, args.mode, seeds=[args.seed + i for i in range(len(prompts))],
                         max_new_tokens=args.max_tokens, **request_args(args))
    for req in reqs:
        check_positions(pipe.model.cfg, _prompt_tokens(pipe.tokenizer, req), args.mode, req.max_tokens)
    results = pipe.generate_batch(reqs, progress=not args.no_progress)
    for i, (req, (r0, r1)) in enumerate(zip(reqs, results)):
        print(f"[{i}] prompt {req.prompt!r} seed {req.params.seed}")
        if req.max_tokens:
            print(f"    text: {r0.text!r}")
        if r1 is not None:
            write_image(r1.image, outs[i])
            print(f"    latent md5 {r1.latent_md5}  pixels md5 {r1.image_md5}  file md5 {file_md5(outs[i])}  "
                  f"-> {outs[i]}")
            if req.params.cache.enabled:
                print(f"    {cache_line(r1.cache_stats)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
