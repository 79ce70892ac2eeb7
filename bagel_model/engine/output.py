"""What a generation produces: the result record, its md5s and the VAE decode of a final latent."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from ..core.model import BagelModel
from ..core.sampling import SamplingParams
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
    # step cache: middle-layer job-steps computed and reused (engine.cache; both 0 without caching)
    cache_stats: dict = field(default_factory=lambda: {"computed": 0, "reused": 0})

    def save_png(self, path: str) -> None:
        Image.fromarray(self.image.cpu().numpy()).save(path, format="PNG")


def decode_latent(model: BagelModel, latent: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """VAE decode of final latent tokens on a (rows, cols) latent grid -> (H, W, 3) uint8."""
    h, w = grid
    z = unpatchify(latent.float(), h, w, model.cfg.latent_patch_size)[None]
    with torch.no_grad():
        pixels = model.vae.decode(z.to(model.device))[0]
    return to_uint8_image(pixels)
