"""Backend choice for every kernel entry point, from its ``KernelOptions`` (see ``options``).

CUDA tensors go to Triton (and, per op, to the Gluon kernels on Hopper where the op's dispatcher finds them
applicable); CPU tensors go to the plain-torch reference, unless the options ask for "triton" (tests do, with
TRITON_INTERPRET=1 so the Triton interpreter runs the very kernel the GPU compiles).
"""
from __future__ import annotations

import functools
from typing import Literal

import torch
import triton
import triton.knobs

from .options import KernelOptions, resolve_options

Family = Literal["triton", "reference"]


def triton_interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (Triton's own TRITON_INTERPRET knob, asked of Triton)."""
    return bool(triton.knobs.runtime.interpret)


def resolve_backend(device: torch.device, options: KernelOptions | None = None) -> Family:
    """The kernel family for tensors on ``device``: "reference" (plain torch) or "triton" (Triton, or Gluon where
    the op's dispatcher finds it applicable: ``use_gluon``)."""
    opts = resolve_options(options)
    if opts.backend == "reference" or (opts.backend == "auto" and device.type != "cuda"):
        return "reference"
    if device.type != "cuda":
        if opts.backend == "gluon":
            raise RuntimeError("backend='gluon' runs on a Hopper GPU; these tensors are on the CPU")
        if not triton_interpreting():
            raise RuntimeError(
                "backend='triton' on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 "
                "before importing triton (tests/conftest.py does)"
            )
    return "triton"


def use_gluon(device: torch.device, dtype: torch.dtype, options: KernelOptions | None = None) -> bool:
    """Whether the options allow the Gluon kernels and the hardware runs them (the op decides whether the call is
    one its Gluon kernel covers)."""
    return resolve_options(options).backend in ("auto", "gluon") and gluon_available(device, dtype)


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
