"""What a generation produces and the single-device pieces that produce it: the result record, its md5s, the
text-to-image CFG contexts, the single-device velocity function and the VAE decode of a latent. Shared by the
pipeline (``pipeline``), the stages (``stages``) and the sweep, below all of them."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from PIL import Image

from .denoise import SamplingParams, VelocityFn
from ..core.model import BagelModel, BranchContext, GenSequence
from ..core.tokenizer import BagelTokenizer
from ..core.vae import to_uint8_image, unpatchify


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
