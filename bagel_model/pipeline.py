"""BagelPipeline: BAGEL end to end on one device — ``pipe(prompt, ...)`` in diffusers' shape, ``from_pretrained`` /
``save_pretrained`` / ``to``, over the explicit ``Request`` API (``generate``, ``generate_batch``). ``make_requests``
turns a call's arguments into requests (the CLI's split run uses it too); every default comes from
``core.sampling.resolve_sampling``."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from bagel_kernels import KernelOptions, default_options, require_fp8_support

from .core import checkpoint
from .core.config import PRESETS, BagelConfig
from .core.image_io import as_rgb_tensor
from .core.memory import check_fits
from .core.model import BagelModel
from .core.sampling import _integer, resolve_sampling
from .core.tokenizer import BagelTokenizer
from .core.transforms import vae_resize_rule
from .engine.step import PackedStep
from .serving.stages import IMAGE_IN, IMAGE_OUT, MODES, Request, run_stage0, run_stage1_batch


OUTPUT_TYPES = ("pil", "np", "pt")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# the diffusers-style name of a sampling parameter, for messages
_ARG_NAMES = {"steps": "num_inference_steps"}


@dataclass
class BagelPipelineOutput:
    """What ``BagelPipeline.__call__`` returns. ``text`` has one entry per prompt; for image modes so do the others
    (for text modes they are empty).

    - ``images``: as ``output_type`` asked: ``PIL.Image.Image``, or float32 in [0, 1] — numpy (H, W, 3) for
      ``"np"``, torch (3, H, W) for ``"pt"`` — holding exactly the decoded uint8 pixels / 255
      (``round(x * 255)`` gives them back).
    - ``text``: the decoded answer (text modes), or the tokens decoded before the image (``max_new_tokens``).
    - ``latents``: the final fp32 latents in BAGEL's packed token space, (latent tokens, patch_dim).
    - ``latent_md5s`` / ``image_md5s``: md5 of each latent's bytes / of the decoded uint8 (H, W, 3) pixels —
      what ``bagel-generate`` prints as "latent md5" and "pixels md5"."""

    images: list
    text: list[str]
    latents: list[torch.Tensor]
    latent_md5s: list[str]
    image_md5s: list[str]
    cache_stats: list[dict] = field(default_factory=list)  # per image: middle-layer job-steps computed / reused


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | str) -> torch.dtype:
    """``None``: float32 on CPU, bfloat16 on CUDA; a name (``"bf16"``, ``"float32"``, ...) or a torch dtype."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype or one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype} is not supported; expected float32, bfloat16 or float16")
    return dtype


def check_device(device: torch.device | str) -> torch.device:
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r} is not a torch device (cpu, cuda, cuda:N): {e}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {d}: no CUDA GPU is visible to torch (CUDA build: {torch.version.cuda or 'none'})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {d}: only {torch.cuda.device_count()} GPU(s) visible")
    elif d.type != "cpu":
        raise ValueError(f"device {d}: only cpu and cuda are supported")
    return d


def _kernel_options(kernels: KernelOptions | str | None, quantization: str | None = None) -> KernelOptions | None:
    """``KernelOptions`` from an instance, a mode name ("exact" | "fast") or None (the process default), with
    ``quantization`` ("none" | "fp8") set on it when given."""
    if quantization is not None:
        base = _kernel_options(kernels) or default_options()
        if base.quantization not in ("none", quantization):
            raise ValueError(f"quantization={quantization!r} contradicts kernels with quantization="
                             f"{base.quantization!r}; give one of them")
        return dataclasses.replace(base, quantization=quantization)  # validated by KernelOptions
    if kernels is None:
        return None
    if isinstance(kernels, str):
        return KernelOptions(mode=kernels)
    if not isinstance(kernels, KernelOptions):
        raise TypeError(f"kernels must be a KernelOptions or a mode name ('exact', 'fast'), got {kernels!r}")
    return kernels


def _seeds(n: int, seed, generator) -> list[int]:
    """One noise seed per prompt, from ``seed`` (int or list) or ``generator`` (torch.Generator or list)."""
    if seed is not None and generator is not None:
        raise ValueError("give seed or generator, not both")
    if generator is not None:
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
        for g in gens:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(g).__name__}")
        seeds = [g.initial_seed() for g in gens]
        what = "generators"
    else:
        given = [0] if seed is None else (list(seed) if isinstance(seed, (list, tuple)) else [seed])
        seeds = [_integer("seed", s) for s in given]
        what = "seeds"
    if len(seeds) == 1:
        return seeds * n
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} {what} for {n} prompts: give one, or one per prompt")
    return seeds


def _output_image(image: torch.Tensor, output_type: str):
    if output_type == "pil":
        from PIL import Image

        return Image.fromarray(image.cpu().numpy())
    if output_type == "np":
        return image.cpu().numpy().astype(np.float32) / np.float32(255.0)
    return image.permute(2, 0, 1).float() / 255.0


def make_requests(cfg: BagelConfig, prompts: list[str] | None, mode: str = "text2img", *,
                  images: list[torch.Tensor] | None = None, seeds: list[int] | None = None,
                  max_new_tokens: int | None = None, prompt_ids: list[int] | None = None, **sampling) -> list[Request]:
    """The requests of one call: one per prompt (or one for ``prompt_ids``), each with ``SamplingParams`` from
    ``resolve_sampling(cfg, mode, **sampling)`` (a None value is "not given"). ``images``: (H, W, 3) uint8 tensors,
    one for all prompts or one per prompt; img2img's size is its image's after upstream's resize rule. ``seeds``: one
    per prompt (default 0). ``max_new_tokens``: default 32 for text modes, 0 for images. Everything a mode would
    ignore is an error here, before any work."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if prompt_ids is not None:
        if prompts:
            raise ValueError("give the prompt as text or as prompt_ids, not both")
        prompts = [""]
    n = len(prompts)
    if mode not in IMAGE_OUT:
        extra = [k for k, v in sampling.items() if v is not None]
        if extra:
            raise ValueError(f"mode {mode} produces text: {', '.join(_ARG_NAMES.get(k, k) for k in extra)} "
                             "would be ignored")
    if mode in IMAGE_IN and not images:
        raise ValueError(f"mode {mode} needs an input image (image=...)")
    if mode not in IMAGE_IN and images:
        raise ValueError(f"mode {mode} takes no input image; an image given means img2img (or mode='img2text')")
    if mode == "img2img" and (sampling.get("height") is not None or sampling.get("width") is not None):
        raise ValueError("img2img outputs the input image's size (resized as upstream BAGEL does); height and "
                         "width are for text2img")
    if images is not None and len(images) not in (1, n):
        raise ValueError(f"{len(images)} images for {n} prompts: give one, or one per prompt")
    per_prompt_images = (images * n if len(images) == 1 else images) if images else [None] * n
    seeds = seeds if seeds is not None else [0] * n
    tokens = 32 if mode not in IMAGE_OUT else 0
    if max_new_tokens is not None:
        tokens = _integer("max_new_tokens", max_new_tokens)
    reqs = []
    for i, (prompt, im, seed) in enumerate(zip(prompts, per_prompt_images, seeds)):
        given = dict(sampling, seed=seed)
        if mode == "img2img":
            given["height"], given["width"] = vae_resize_rule(cfg).output_size(*im.shape[:2])
        params = resolve_sampling(cfg, mode, _ARG_NAMES, **given)
        if mode in IMAGE_OUT:
            cfg.check_image_size(params.height, params.width)
        reqs.append(Request(mode, prompt, params, im, tokens, request_id=f"request-{i}",
                            prompt_ids=prompt_ids).validate())
    return reqs


class BagelPipeline:
    """BAGEL end to end: ``pipe(prompt, ...)`` in diffusers' shape, over the explicit ``Request`` API
    (``generate``, ``generate_batch``).

        pipe = BagelPipeline.from_pretrained("tiny")          # a preset (seeded random weights) or a checkpoint dir
        image = pipe("a red cube", num_inference_steps=10, seed=0).images[0]
        edited = pipe("make it blue", image=image).images[0]   # an image in: img2img
        answer = pipe("describe it", image=image, mode="img2text").text[0]
    """

    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer):
        self.model, self.tokenizer = model, tokenizer
        self._progress = True
        self._engine: PackedStep | None = None
        model.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])

    # ---- loading, saving, placement -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str | None = None, kernels: KernelOptions | str | None = None,
                        weights_seed: int | None = None, byte_tokenizer: bool = False, check_memory: bool = True,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool | None = None, quantization: str | None = None) -> "BagelPipeline":
        """A checkpoint in BAGEL-7B-MoT's released layout — a directory, or a hub id (``"ByteDance-Seed/BAGEL-7B-MoT"``)
        resolved through huggingface_hub's cache (``revision``, ``cache_dir``; ``local_files_only`` or
        ``HF_HUB_OFFLINE=1``: the cache alone) — loaded strictly; or a preset name (``"tiny"``, ``"bagel-7b-mot"``:
        ``from_preset``). A directory of a preset's name wins over the preset. ``dtype``: default float32 on CPU,
        bfloat16 on CUDA (the VAE always runs in float32). ``kernels``: ``bagel_kernels.KernelOptions`` or its mode
        name ("exact" | "fast"); None is the process default. ``byte_tokenizer``: a directory without
        ``tokenizer.json`` gets the built-in byte-level tokenizer (presets always use it). ``check_memory``: refuse,
        with the numbers, weights that cannot fit on ``device``. ``quantization``: "fp8" runs the MoT projections with
        FP8 weights (the same as ``kernels=KernelOptions(quantization="fp8")``; a checkpoint saved in FP8 loads in
        FP8 whatever is given)."""
        from .core.hub import looks_like_hub_id, resolve_hub_id

        name = os.fspath(name_or_path)
        if not os.path.isdir(name) and name in PRESETS:
            if byte_tokenizer:
                raise ValueError("byte_tokenizer is for checkpoint directories (presets always use it)")
            return cls.from_preset(name, device, dtype, kernels, weights_seed, check_memory, quantization=quantization)
        if weights_seed is not None:
            raise ValueError(f"weights_seed is for presets' random weights; {name!r} is a checkpoint")
        if not os.path.isdir(name):
            if looks_like_hub_id(name):
                name = resolve_hub_id(name, revision, cache_dir, local_files_only)
            elif os.sep in name or name.startswith("."):
                raise FileNotFoundError(f"checkpoint directory not found: {name!r}")
            else:
                raise ValueError(f"{name!r} is neither a checkpoint directory, a hub id (owner/name) nor a preset "
                                 f"({', '.join(PRESETS)})")
        device = check_device(device)
        model, tok = checkpoint.from_pretrained(name, device=device, dtype=resolve_dtype(dtype, device),
                                                byte_tokenizer=byte_tokenizer, check_memory=check_memory,
                                                kernels=_kernel_options(kernels, quantization))
        return cls(model, tok)

    @classmethod
    def from_preset(cls, name: str, device: torch.device | str = "cpu", dtype: torch.dtype | str | None = None,
                    kernels: KernelOptions | str | None = None, weights_seed: int | None = None,
                    check_memory: bool = True, quantization: str | None = None) -> "BagelPipeline":
        """An embedded preset (``"tiny"``, ``"bagel-7b-mot"``) with random weights drawn from ``weights_seed``
        (default 0; the same on every device) and the built-in byte-level tokenizer. ``quantization="fp8"``: the
        weights are drawn in ``dtype``, then the MoT projections quantized to FP8 (``from_pretrained``)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; available presets: {', '.join(PRESETS)}")
        device = check_device(device)
        dtype = resolve_dtype(dtype, device)
        cfg = BagelConfig.preset(name)
        opts = _kernel_options(kernels, quantization)
        if check_memory:  # refuse with the number before allocating
            check_fits(cfg, dtype, device, quantization=(opts or default_options()).quantization)
        seed = 0 if weights_seed is None else _integer("weights_seed", weights_seed)
        if not 0 <= seed < 2**64:
            raise ValueError(f"weights_seed must be in [0, 2**64), got {seed}")
        model = BagelModel.random(cfg, seed=seed, dtype=dtype, device=device, kernels=opts)
        return cls(model, BagelTokenizer.from_directory(None))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model and tokenizer in the released layout; ``from_pretrained(directory)`` gives the same
        bits."""
        checkpoint.save_pretrained(self.model, os.fspath(directory), self.tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.no_grad()
    def to(self, device: torch.device | str | torch.dtype | None = None,
           dtype: torch.dtype | str | None = None) -> "BagelPipeline":
        """Move and/or cast in place (``pipe.to("cuda")``, ``pipe.to(torch.bfloat16)``, ``pipe.to("cuda",
        "bf16")``); returns the pipeline. The VAE stays float32. The weights end up as loading them there would
        make them: a move is an exact copy, and a cast from float32 rounds as loading in that dtype does (a cast
        between 16-bit dtypes rounds twice: load in the dtype you want instead). The per-expert packs are rebuilt on
        the new storage, and the device-resident tables follow."""
        if isinstance(device, (torch.dtype, str)) and dtype is None and (
                isinstance(device, torch.dtype) or device in DTYPES):
            device, dtype = None, device
        m = self.model
        dev = check_device(device) if device is not None else m.device
        dt = resolve_dtype(dtype, dev) if dtype is not None else m.dtype
        if dev.type == "cuda" and (dev != m.device or dt != m.dtype):
            check_fits(m.cfg, dt, dev)
            require_fp8_support(m.kernels, dev, dt)  # FP8 weights keep their codes and scales across the move
        # narrow before moving (the device never holds the wide copy), widen after
        narrow = dt.itemsize <= m.dtype.itemsize
        if narrow and dt != m.dtype:
            m.to_dtype(dt)
        if dev != m.device:
            m.to(dev)
        if not narrow:
            m.to_dtype(dt)
        m.pack_experts()
        # device-resident tables: the marker ids are rebuilt; the latent position-id cache is dropped (rebuilt on
        # first use, on the new device)
        self.model.set_marker_ids(self.tokenizer.special["start_of_image"], self.tokenizer.special["end_of_image"])
        m.__dict__.pop("_pos_cache", None)
        self._engine = None  # its buffers and graphs live on the old device / dtype
        return self

    def step_engine(self) -> PackedStep:
        """The denoise step engine every call of this pipeline uses unless given one: kept across calls, so a
        request whose job layouts (image sizes, context lengths) ran before replays their CUDA graphs at once
        instead of running eagerly and recording them again. It keeps the latest 4 layouts with their context
        buffers (an img2img layout at 1024² holds about 1 GB of context K/V in bf16); ``step_engine().reset()``
        frees them. Its contexts are copied into the engine's buffers, so the bits are
        those of a fresh engine."""
        if self._engine is None:
            self._engine = PackedStep(self.model)
        return self._engine

    def set_progress_bar_config(self, disable: bool = False) -> None:
        """diffusers' switch for the denoising progress bar (shown by default)."""
        self._progress = not disable

    # ---- diffusers-shaped call ----------------------------------------------------------------------------------
    def __call__(self, prompt: str | list[str], image=None, *, mode: str | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 cfg_text_scale: float | None = None, cfg_img_scale: float | None = None,
                 cfg_interval: tuple[float, float] | None = None, cfg_renorm_type: str | None = None,
                 cfg_renorm_min: float | None = None, timestep_shift: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 seed: int | list[int] | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] | None = None,
                 max_new_tokens: int | None = None, cache=None, return_dict: bool = True):
        """Generate for one prompt or a list of them; returns ``BagelPipelineOutput`` (``return_dict=False``: the
        tuple ``(images, text)``).

        - ``image``: an input image — PIL, numpy or torch, (H, W, C) or (C, H, W), uint8 or float in [0, 1], or a
          file path (``image_io.as_rgb_tensor``) — or a list with one per prompt. Any size: it is resized as
          upstream BAGEL does, and img2img outputs that size (``height``/``width`` are for text2img only).
        - ``mode``: "text2img" | "img2img" | "text2text" | "img2text"; default img2img when an image is given, else
          text2img. Text modes return ``text``; the denoising arguments are refused there.
        - ``num_inference_steps``: BAGEL's timestep count N (upstream's ``num_timesteps``): the schedule has N
          points from t=1 to t=0, so the model runs N-1 times (N-1 Euler updates). diffusers' flow-matching
          pipelines run the model ``num_inference_steps`` times; here 50 means 49 evaluations, as upstream BAGEL.
          Default: the model config's (50 for BAGEL-7B-MoT, 10 for ``tiny``).
        - ``height``/``width``: text2img's image size, multiples of the latent stride (16); default the model's
          largest (``core.sampling.default_image_size``: 1024 on BAGEL-7B-MoT, 256 on ``tiny``).
        - ``cfg_*``, ``timestep_shift``: every default is ``core.sampling.resolve_sampling``'s — upstream's
          text2img settings, the model config's own, and image editing's (``MODE_DEFAULTS``) for img2img.
        - ``seed`` (int, or one per prompt) or ``generator`` (``torch.Generator``, or one per prompt): BAGEL draws
          its noise (and img2img's VAE sample) on its own CPU generator seeded with the seed — for a generator,
          ``generator.initial_seed()``, whatever it has drawn since and whatever its device — so a seed means the
          same noise on every device, run after run. One seed for a list of prompts gives each prompt the image it gets alone
          with that seed. Neither: seed 0.
        - ``output_type``: "pil" | "np" | "pt" (see ``BagelPipelineOutput``).
        - ``callback_on_step_end(pipe, step, timestep, callback_kwargs) -> dict | None``: called after every Euler
          update of every request, with diffusers' arguments: ``step`` counts from 0 to N-2, ``timestep`` is
          BAGEL's shifted t in (0, 1] of that update (a float, not diffusers' t x 1000), ``callback_kwargs`` is
          ``{"request_index": i}`` (the prompt's index), plus ``"latents"`` — that request's (tokens, 64) fp32
          latent after the update — when ``callback_on_step_end_tensor_inputs=["latents"]``. A returned dict's
          ``"latents"`` (same shape) replaces the latent from the next step on, as in diffusers (the result is then
          no longer the request's plain run).
        - ``max_new_tokens``: greedy decoding budget: default 32 for text modes, 0 for images.
        - ``cache``: step caching of the denoiser — "fixed", "dbcache", "taylorseer" or a
          ``core.sampling.CacheConfig``; default none (every bit as without). A cached request is its own
          exactness class: alone, in a batch and in every parallel configuration it gives the same bits, which
          differ from the uncached ones. ``cache_stats`` of the output counts the middle-layer steps computed and
          reused.

        A list of prompts runs as one batch (``generate_batch``: one packed denoise); each result is bit-identical
        to that prompt's call alone."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        n = len(prompts)
        if mode is None:
            mode = "img2img" if image is not None else "text2img"
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError("callback_on_step_end must be callable: callback(pipe, step, timestep, callback_kwargs)")
        tensor_inputs = list(callback_on_step_end_tensor_inputs or [])
        if any(name != "latents" for name in tensor_inputs):
            raise ValueError(f"callback_on_step_end_tensor_inputs={tensor_inputs!r}: the only tensor input BAGEL's "
                             "callback offers is 'latents'")
        if mode not in IMAGE_OUT and callback_on_step_end is not None:
            raise ValueError(f"mode {mode} produces text: callback_on_step_end would be ignored")
        images: list | None = None
        if image is not None:
            batched = isinstance(image, (list, tuple)) or (isinstance(image, (np.ndarray, torch.Tensor))
                                                             and image.ndim == 4)
            images = [as_rgb_tensor(im) for im in (list(image) if batched else [image])]
        reqs = make_requests(self.model.cfg, prompts, mode, images=images, seeds=_seeds(n, seed, generator),
                             max_new_tokens=max_new_tokens, steps=num_inference_steps, height=height, width=width,
                             cfg_text_scale=cfg_text_scale, cfg_img_scale=cfg_img_scale, cfg_interval=cfg_interval,
                             cfg_renorm_type=cfg_renorm_type, cfg_renorm_min=cfg_renorm_min,
                             timestep_shift=timestep_shift, cache=cache)

        on_step = None
        if callback_on_step_end is not None:
            def on_step(i: int, k: int, t: float, x: torch.Tensor) -> torch.Tensor | None:
                kwargs = {"request_index": i}
                if "latents" in tensor_inputs:
                    kwargs["latents"] = x
                out = callback_on_step_end(self, k, t, kwargs)
                if out is not None and not isinstance(out, dict):
                    raise TypeError(f"callback_on_step_end must return a dict or None, got {type(out).__name__}")
                new = (out or {}).get("latents")
                return None if new is None or new is x else new

        results = self.generate_batch(reqs, progress=self._progress, on_step=on_step)
        text = [r0.text for r0, _ in results]
        outs = [r1 for _, r1 in results if r1 is not None]
        out = BagelPipelineOutput(images=[_output_image(r.image, output_type) for r in outs], text=text,
                                  latents=[r.latent for r in outs], latent_md5s=[r.latent_md5 for r in outs],
                                  image_md5s=[r.image_md5 for r in outs], cache_stats=[r.cache_stats for r in outs])
        return out if return_dict else (out.images, out.text)

    def generate(self, req, progress: bool = False, engine=None):
        """Any mode through both stages in this process (single stage). Returns (stage-0 result, image result or
        None for text outputs). The split runs (``bagel_model.serving.stages.run_split_threads``,
        ``bagel_model.serving.split.run_split_processes``) give the same image bit for bit."""
        return self.generate_batch([req], progress, engine)[0]

    def generate_batch(self, reqs: list, progress: bool = False, engine=None,
                       on_step: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None) -> list:
        """Several requests at once (any modes, prompts, seeds, sizes, step counts, CFG settings): stage 0 for each,
        then ONE batched denoise in which every step packs the CFG jobs of all image requests still running into one
        forward. Returns one (stage-0 result, image result or None) per request, each bit-identical to running the
        request alone (the batch-invariance contract: no row's arithmetic depends on the other rows).
        ``on_step(request_index, step, t, x)``: called after each image request's Euler update (index into
        ``reqs``) with its latent; a tensor it returns replaces the latent."""
        if not reqs:
            raise ValueError("generate_batch needs at least one request")
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique within a batch, got {ids}")
        r0s = [run_stage0(self.model, self.tokenizer, r) for r in reqs]
        img = [i for i, r in enumerate(reqs) if r.mode in IMAGE_OUT]
        r1s: list = [None] * len(reqs)
        if img:
            hook = None if on_step is None else (lambda j, k, t, x: on_step(img[j], k, t, x))
            engine = engine if engine is not None else self.step_engine()
            outs = run_stage1_batch(self.model, [r0s[i].diffusion for i in img], progress=progress, engine=engine,
                                    on_step=hook)
            for i, o in zip(img, outs):
                r1s[i] = o
        return list(zip(r0s, r1s))
