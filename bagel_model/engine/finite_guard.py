"""Detect a non-finite (NaN/Inf) latent during denoising without a host read inside the loop.

A NaN or Inf anywhere in the latent spreads to every token within a step or two and ends as a black (or otherwise
meaningless) image with exit code 0. ``FiniteGuard.step`` records, on the device, the first step whose latent is
not all finite (one small reduction per step, no synchronization); ``check`` reads that once, after the loop, and
raises ``NonFiniteLatentError`` naming the step. Usage in any denoise loop::

    guard = FiniteGuard()
    for i in ...:
        x = ...
        guard.step(x, i)
    guard.check(len(ts))
"""
from __future__ import annotations

import torch

_NONE = 2**62  # "no bad step yet" (larger than any step index)


class NonFiniteLatentError(FloatingPointError):
    pass


class FiniteGuard:
    def __init__(self):
        self._first: torch.Tensor | None = None  # device int64: index of the first non-finite step, or _NONE

    def step(self, x: torch.Tensor, i: int) -> None:
        """Note whether ``x`` (the latent after step ``i``) is all finite — on the device, no host read."""
        bad_at = torch.where(torch.isfinite(x).all(), _NONE, i)  # 0-dim int64 on x's device
        self._first = bad_at if self._first is None else torch.minimum(self._first, bad_at)

    def first_bad_step(self) -> int | None:
        """The first step whose latent was non-finite (one host read), or None."""
        if self._first is None:
            return None
        first = int(self._first)
        return None if first == _NONE else first

    def check(self, n_steps: int | None = None, what: str = "latent") -> None:
        first = self.first_bad_step()
        if first is not None:
            of = f" of {n_steps}" if n_steps is not None else ""
            raise NonFiniteLatentError(
                f"the {what} became non-finite (NaN/Inf) at denoise step {first}{of} (0-based): non-finite inputs, "
                "weights or parameters (a NaN guidance scale or timestep shift, NaN weights) - no image is written")
