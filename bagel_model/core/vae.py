"""FLUX autoencoder (BAGEL's ``ae.safetensors``): encoder, decoder, latent scale/shift and 2x2 patchification."""
from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .config import VAEConfig


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=c, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(torch.nn.functional.silu(self.norm1(x)))
        h = self.conv2(torch.nn.functional.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        b, c, hh, ww = h.shape
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(a, "b 1 (h w) c -> b c h w", h=hh, w=ww))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(torch.nn.functional.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = (1,) + tuple(cfg.ch_mult)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(cfg.ch_mult)):
            level = nn.Module()
            cin, cout = cfg.ch * mult[i], cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks)])
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cout)
            self.down.append(level)
        c = cfg.ch * cfg.ch_mult[-1]
        self.mid = _Mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _Mid(c)
        self.up = nn.ModuleList()
        cin = c
        for i in reversed(range(len(cfg.ch_mult))):
            level = nn.Module()
            cout = cfg.ch * cfg.ch_mult[i]
            level.block = nn.ModuleList([ResnetBlock(cin if j == 0 else cout, cout) for j in range(cfg.num_res_blocks + 1)])
            cin = cout
            if i != 0:
                level.upsample = Upsample(cout)
            self.up.insert(0, level)  # checkpoint index i is resolution level i
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for blk in level.block:
                h = blk(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, z, H/8, W/8); samples the posterior with ``noise``
        (N(0, 1) of the latent's shape) or, without it, noise drawn from ``generator`` on the CPU."""
        mean, logvar = self.encoder(pixels).chunk(2, dim=1)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu")
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"posterior noise has shape {tuple(noise.shape)}, the latent {tuple(mean.shape)}")
        # No clamp of the log-variance: upstream's DiagonalGaussian has none (a clamp would change the sample).
        z = mean + torch.exp(0.5 * logvar) * noise.to(mean.device, mean.dtype)
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)


def patchify(latent: torch.Tensor, p: int) -> torch.Tensor:
    """(C, h*p, w*p) -> (h*w, p*p*C) tokens, row-major, as BAGEL packs them."""
    return rearrange(latent, "c (h p) (w q) -> (h w) (p q c)", p=p, q=p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    return rearrange(tokens, "(h w) (p q c) -> c (h p) (w q)", h=h, w=w, p=p, q=p)


def to_uint8_image(pixels: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8; the conversion truncates, as BAGEL's does."""
    return ((pixels.float() * 0.5 + 0.5).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).contiguous()
