"""Text-to-image generation with the thin BAGEL model (single device; parallel runs plug in their velocity function)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from .denoise import SamplingParams, VelocityFn, denoise, initial_noise
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
    def fn(x: torch.Tensor, t: float, branches: tuple[str, ...]) -> dict[str, torch.Tensor]:
        return {b: model.gen_velocity(x, t, seq, contexts[b]) for b in branches}
    return fn


def decode_latent(model: BagelModel, latent: torch.Tensor, seq: GenSequence) -> torch.Tensor:
    h, w = seq.grid
    z = unpatchify(latent.float(), h, w, model.cfg.latent_patch_size)[None]
    with torch.no_grad():
        pixels = model.vae.decode(z.to(model.device))[0]
    return to_uint8_image(pixels)


class BagelPipeline:
    def __init__(self, model: BagelModel, tokenizer: BagelTokenizer):
        self.model, self.tokenizer = model, tokenizer
        model.set_marker_ids(tokenizer.special["start_of_image"], tokenizer.special["end_of_image"])

    def generate(self, req, kv_layout: str = "flash_attn", progress: bool = False):
        """Any mode through both stages in this process (single stage). Returns (stage-0 result, image result or
        None for text outputs). The split runs (``bagel_model.stages.run_split_threads``,
        ``bagel_model.split.run_split_processes``) give the same image bit for bit."""
        from .stages import IMAGE_OUT, run_stage0, run_stage1

        r0 = run_stage0(self.model, self.tokenizer, req)
        r1 = run_stage1(self.model, r0.payload, r0.contexts, kv_layout, progress=progress) if req.mode in IMAGE_OUT else None
        return r0, r1

    def text_to_image(self, prompt: str, params: SamplingParams, progress: bool = True,
                      velocities: VelocityFn | None = None, seq: GenSequence | None = None) -> GenerationResult:
        params.validate()
        from bagel_kernels import token_alignment

        seq = seq or make_gen_sequence(self.model.cfg, params.height, params.width, 1, token_alignment(self.model.device))
        contexts = text_to_image_contexts(self.model, self.tokenizer, prompt)
        fn = velocities or single_device_velocities(self.model, seq, contexts)
        x0 = initial_noise(seq.n_latent, self.model.cfg.patch_latent_dim, params.seed).to(self.model.device)
        x = denoise(x0, params, fn, progress=progress)
        image = decode_latent(self.model, x, seq)
        return GenerationResult(latent=x, image=image, latent_md5=tensor_md5(x), image_md5=tensor_md5(image))
