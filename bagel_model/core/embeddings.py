"""Timestep embedder and the frozen 2-D sin-cos position tables (latent grid, ViT patches)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from bagel_kernels import KernelOptions, invariant_linear


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) table; row r*grid+c. First half of the dims encodes the column, second half the row."""
    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    table = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()


class PositionEmbedding(nn.Module):
    """A frozen 2-D sin-cos table stored as the checkpoint parameter ``pos_embed``."""

    def __init__(self, grid: int, hidden: int):
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(sincos_2d_table(hidden, grid), requires_grad=False)

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


def latent_position_ids(h: int, w: int, max_latent_size: int) -> torch.Tensor:
    """Row-major ids r*max_latent_size + c of an h x w latent grid."""
    r = torch.arange(h)[:, None]
    c = torch.arange(w)[None, :]
    return (r * max_latent_size + c).reshape(-1)


class TimestepEmbedder(nn.Module):
    """256-dim sinusoid of the flow time (cos half first), then Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def sinusoid(self, t: torch.Tensor, max_period: float = 10000.0) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor, options: KernelOptions | None = None) -> torch.Tensor:
        lin1, lin2 = self.mlp[0], self.mlp[2]
        x = self.sinusoid(t).to(lin1.weight.dtype)
        x = torch.nn.functional.silu(invariant_linear(x, lin1.weight, lin1.bias, options=options))
        return invariant_linear(x, lin2.weight, lin2.bias, options=options)
