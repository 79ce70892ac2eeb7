"""Backend choice for every kernel entry point.

CUDA tensors go to Triton. CPU tensors go to the plain-torch reference, unless the caller asks for "triton"
(tests do, with TRITON_INTERPRET=1 so the Triton interpreter runs the very kernel the GPU compiles).
``BAGEL_KERNELS_BACKEND`` overrides the default for a whole process.
"""
from __future__ import annotations

import functools
import os
from typing import Literal

import torch

Backend = Literal["triton", "reference"]
_VALID = ("triton", "reference")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> Backend:
    """Pick the backend for tensors on ``device``; an explicit ``backend`` wins, then the environment."""
    choice = backend or os.environ.get("BAGEL_KERNELS_BACKEND") or None
    if choice is not None:
        if choice not in _VALID:
            raise ValueError(f"unknown kernel backend {choice!r}; expected one of {_VALID}")
        if choice == "triton" and device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton (tests/conftest.py does)"
            )
        return choice  # type: ignore[return-value]
    return "triton" if device.type == "cuda" else "reference"


Mode = Literal["exact", "fast"]
_MODES = ("exact", "fast")


def resolve_mode(mode: str | None = None) -> Mode:
    """"exact" (default): every GEMM is the batch-invariant Triton kernel, so sequence-parallel runs reproduce one
    device bit for bit. "fast": dense projections may call cuBLAS, which picks its algorithm from M — rows then
    depend on how many tokens share the call, and parallel runs match one device only to rounding.
    ``BAGEL_KERNELS_MODE`` sets the process default."""
    choice = mode or os.environ.get("BAGEL_KERNELS_MODE") or "exact"
    if choice not in _MODES:
        raise ValueError(f"unknown kernel mode {choice!r}; expected one of {_MODES}")
    return choice  # type: ignore[return-value]


@functools.lru_cache(maxsize=None)
def _gluon_importable() -> bool:
    try:  # Gluon ships with Triton >= 3.5 (the project pins 3.6); the Hopper parts are what the kernels use
        import triton.experimental.gluon.language.nvidia.hopper  # noqa: F401
        import triton.experimental.gluon.nvidia.hopper  # noqa: F401
    except ImportError:
        return False
    return True


@functools.lru_cache(maxsize=None)
def _sm_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def gluon_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Where the warp-specialized Gluon kernels run (routed GEMM, attention): a Hopper GPU (sm_90) and 16-bit
    operands. Cached per device: it is asked on every kernel call."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16) or not _gluon_importable():
        return False
    return _sm_major(device.index if device.index is not None else torch.cuda.current_device()) == 9
