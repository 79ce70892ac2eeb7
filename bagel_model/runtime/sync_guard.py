"""A guard that fails on host reads of tensor values (device-to-host synchronization) inside a region.

On CPU there is no device, so the guard patches the Tensor methods that read values on the host (``item``,
``tolist``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``, ``numpy``); on CUDA it also sets
``torch.cuda.set_sync_debug_mode("error")``, which catches the synchronizing copies and kernels themselves.
"""
from __future__ import annotations

import contextlib

import torch

_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy")


class HostSyncError(RuntimeError):
    pass


@contextlib.contextmanager
def forbid_host_sync(cuda: bool | None = None):
    saved = {name: getattr(torch.Tensor, name) for name in _METHODS}

    def make(name):
        def raiser(self, *a, **k):
            raise HostSyncError(f"host read of a tensor value (Tensor.{name}) inside a no-sync region")
        return raiser

    use_cuda = torch.cuda.is_available() if cuda is None else cuda
    prev_mode = torch.cuda.get_sync_debug_mode() if use_cuda else None
    try:
        for name in _METHODS:
            setattr(torch.Tensor, name, make(name))
        if use_cuda:
            torch.cuda.set_sync_debug_mode("error")
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)
        if use_cuda:
            torch.cuda.set_sync_debug_mode(prev_mode)
