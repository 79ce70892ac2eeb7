"""Input-image preprocessing as upstream BAGEL does it (``data/transforms.py``, ``data/data_utils.py``).

Upstream resizes every input image twice over: for the VAE (``ImageTransform(1024, 512, 16)``: longest side <= 1024,
shortest >= 512, both multiples of the generation stride 16) and, from that result, for the ViT
(``ImageTransform(980, 224, 14)``: <= 980, >= 224, multiples of the patch size 14), keeping the aspect ratio, with
PIL's bicubic filter; then ``ToTensor`` and ``Normalize(0.5, 0.5)``. Those numbers are the 7B model's tables:
1024 = max_latent_size 64 x latent stride 16 and 980 = vit_max_num_patch_per_side 70 x patch 14. For another
configuration the rule is scaled from its own tables (``vae_resize_rule``, ``vit_resize_rule``), so the resized image
always fits the position tables; for BAGEL-7B-MoT the scaled rule is upstream's exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import BagelConfig

UPSTREAM_MAX_PIXELS = 14 * 14 * 9 * 1024  # ImageTransform's default max_pixels


@dataclass(frozen=True)
class ResizeRule:
    """Upstream's ``MaxLongEdgeMinShortEdgeResize``: sizes follow its arithmetic step by step (Python ``round``,
    i.e. half to even, included), and the pixels its interpolation (PIL bicubic, which always antialiases)."""

    max_size: int
    min_size: int
    stride: int
    max_pixels: int = UPSTREAM_MAX_PIXELS

    def __post_init__(self):
        if not 0 < self.stride <= self.min_size <= self.max_size:
            raise ValueError(f"resize rule needs 0 < stride <= min_size <= max_size, got {self}")

    def scaled(self, max_size: int, stride: int) -> "ResizeRule":
        """This rule for a model whose largest side is ``max_size``: min_size (rounded to ``stride``) and
        max_pixels scale with it. ``scaled(self.max_size, self.stride)`` is this rule itself."""
        f = max_size / self.max_size
        min_size = min(max_size, max(stride, round(self.min_size * f / stride) * stride))
        return ResizeRule(max_size, min_size, stride, round(self.max_pixels * f * f))

    def _divisible(self, value: float) -> int:
        return max(self.stride, int(round(value / self.stride) * self.stride))

    def _apply(self, width: float, height: float, scale: float) -> tuple[int, int]:
        return self._divisible(round(width * scale)), self._divisible(round(height * scale))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {height}x{width}")
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._apply(width, height, scale)
        if w * h > self.max_pixels:
            w, h = self._apply(w, h, self.max_pixels / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._apply(w, h, self.max_size / max(w, h))
        return h, w

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) uint8 -> resized (H', W', 3) uint8 (unchanged, as a copy, when the size already fits)."""
        check_image(image)
        h, w = self.output_size(*image.shape[:2])
        if (h, w) == tuple(image.shape[:2]):
            return image.clone()  # PIL's resize to the same size is a copy too
        pil = Image.fromarray(image.cpu().numpy())
        return torch.from_numpy(np.array(pil.resize((w, h), Image.BICUBIC))).to(image.device)


VAE_UPSTREAM = ResizeRule(1024, 512, 16)  # app.py / inferencer: ImageTransform(1024, 512, 16)
VIT_UPSTREAM = ResizeRule(980, 224, 14)  # ImageTransform(980, 224, 14)


def vae_resize_rule(cfg: BagelConfig) -> ResizeRule:
    """Upstream's VAE-side rule scaled to ``cfg``'s latent position table (max_latent_size x latent stride)."""
    d = cfg.latent_downsample
    return VAE_UPSTREAM.scaled(cfg.max_latent_size * d, d)


def vit_resize_rule(cfg: BagelConfig) -> ResizeRule:
    """Upstream's ViT-side rule scaled to ``cfg``'s ViT position table (vit_max_num_patch_per_side x patch)."""
    if cfg.vit is None:
        raise ValueError("this model has no ViT (vit_config.json missing): image understanding is unavailable")
    p = cfg.vit.patch_size
    return VIT_UPSTREAM.scaled(cfg.vit_max_num_patch_per_side * p, p)


def check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[-1] != 3 or image.dtype != torch.uint8:
        got = f"{tuple(image.shape)} {image.dtype}" if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be an (H, W, 3) uint8 tensor, got {got}")


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) fp32 in [-1, 1]: ``ToTensor`` then ``Normalize(0.5, 0.5)``. x / 127.5 - 1
    is bit-identical to (x / 255 - 0.5) / 0.5 in fp32 (scaling by 2 commutes with rounding)."""
    check_image(image)
    return (image.permute(2, 0, 1).float() / 127.5 - 1.0)[None]


def pil_img2rgb(image: Image.Image) -> Image.Image:
    """Upstream's ``pil_img2rgb``: transparent images are composited onto white, everything else converted."""
    if image.mode == "RGBA" or image.info.get("transparency", None) is not None:
        image = image.convert("RGBA")
        white = Image.new(mode="RGB", size=image.size, color=(255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def image_from_pil(image: Image.Image) -> torch.Tensor:
    """A PIL image as the (H, W, 3) uint8 tensor the pipeline takes, converted like upstream's ``pil_img2rgb``."""
    return torch.from_numpy(np.array(pil_img2rgb(image)))
