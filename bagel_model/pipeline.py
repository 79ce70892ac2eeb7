"""Text-to-image generation with the thin BAGEL model (single device; parallel runs plug in their velocity function)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .denoise import DenoiseRequest, SamplingParams, VelocityFn, denoise, denoise_batch, initial_noise
from .denoise_step import PackedStep
from .model import BagelModel, BranchContext, GenSequence, make_gen_sequence
from .tokenizer import BagelTokenizer
from .vae import to_uint8_image, unpatchify


def tensor_md5(t: torch.Tensor) -> str:
    return hashlib.md5(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@dataclass
class GenerationResult:
    latent: torch.Tensor  # (n_latent, patch_dim) fp32, final x
    image: torch.Tensor  # (H, W, 3) uint8
    latent_md5: str
    image_md5: str
    params: SamplingParams | None = None  # the request's parameters as the diffusion stage received them

    def save_png(self, path: str) -> None:
        from PIL import Image

        Image.fromarray(self.image.cpu().numpy()).save(path, format="PNG")


def text_to_image_contexts(model: BagelModel, tokenizer: BagelTokenizer, prompt: str) -> dict[str, BranchContext]:
    """The three CFG contexts of text-to-image: full = the prompt; no-text = empty; no-image = full (no input image)."""
    full = model.prefill_text(tokenizer.encode_prompt(prompt))
    return {"full": full, "text": BranchContext.empty(model.cfg.num_layers), "img": full}


def single_device_velocities(model: BagelModel, seq: GenSequence, contexts: dict[str, BranchContext]) -> VelocityFn:
    """The per-branch reference path: one forward per CFG branch (the packed step, ``denoise_step.PackedStep``,
    must reproduce it bit for bit)."""
    def fn(x: torch.Tensor, t: float, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {b: model.gen_velocity(x, t, seq, contexts[b]) for b in branches}
    return fn


def decode_latent(model: BagelModel, latent: torch.Tensor, grid: tuple[int, int] | GenSequence) -> torch.Tensor:
    """VAE decode of final latent tokens on a (rows, cols) latent grid -> (H, W, 3) uint8."""
    h, w = grid.grid if isinstance(grid, GenSequence) else grid
    z = unpatchify(latent.float(), h, w, model.cfg.latent_patch_size)[None]
    with torch.no_grad():
        pixels = model.vae.decode(z.to(model.device))[0]
    return to_uint8_image(pixels)


class BagelPipeline:
    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer):
        self.model, self.tokenizer = model, tokenizer
        model.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])

    def generate(self, req, kv_layout: str = "flash_attn", progress: bool = False, engine=None):
        """Any mode through both stages in this process (single stage). Returns (stage-0 result, image result or
        None for text outputs). The split runs (``bagel_model.stages.run_split_threads``,
        ``bagel_model.split.run_split_processes``) give the same image bit for bit."""
        return self.generate_batch([req], kv_layout, progress, engine)[0]

    def generate_batch(self, reqs: list, kv_layout: str = "flash_attn", progress: bool = False, engine=None) -> list:
        """Several requests at once (any modes, prompts, seeds, sizes, step counts, CFG settings): stage 0 for each,
        then ONE batched denoise in which every step packs the CFG jobs of all image requests still running into one
        forward. Returns one (stage-0 result, image result or None) per request, each bit-identical to running the
        request alone (the batch-invariance contract: no row's arithmetic depends on the other rows)."""
        from .stages import IMAGE_OUT, run_stage0, run_stage1_batch

        if not reqs:
            raise ValueError("generate_batch needs at least one request")
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request ids must be unique within a batch, got {ids}")
        r0s = [run_stage0(self.model, self.tokenizer, r) for r in reqs]
        img = [i for i, r in enumerate(reqs) if r.mode in IMAGE_OUT]
        r1s: list = [None] * len(reqs)
        if img:
            outs = run_stage1_batch(self.model, [r0s[i].payload for i in img], [r0s[i].contexts for i in img],
                                    kv_layout, progress=progress, engine=engine)
            for i, o in zip(img, outs):
                r1s[i] = o
        return list(zip(r0s, r1s))

    def text_to_image(self, prompt: str, params: SamplingParams, progress: bool = True,
                      velocities: VelocityFn | None = None, seq: GenSequence | None = None,
                      engine=None) -> GenerationResult:
        """Text to image with the prompt's contexts prefilled contiguously (the sweep's path). ``velocities``
        (with ``seq``) runs the per-branch reference loop instead of the packed step."""
        params.validate()
        contexts = text_to_image_contexts(self.model, self.tokenizer, prompt)
        grid = self.model.cfg.check_image_size(params.height, params.width)
        x0 = initial_noise(grid[0] * grid[1], self.model.cfg.patch_latent_dim, params.seed).to(self.model.device)
        if velocities is not None:
            from bagel_kernels import token_alignment

            seq = seq or make_gen_sequence(self.model.cfg, params.height, params.width, 1,
                                           token_alignment(self.model.device))
            x = denoise(x0, params, velocities, progress=progress)
        else:
            engine = engine if engine is not None else PackedStep(self.model)
            (x,) = denoise_batch([DenoiseRequest(x0, params, grid, contexts)], engine, progress=progress)
        image = decode_latent(self.model, x, grid)
        return GenerationResult(latent=x, image=image, latent_md5=tensor_md5(x), image_md5=tensor_md5(image))
