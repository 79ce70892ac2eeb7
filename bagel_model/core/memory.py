"""Memory the weights need, estimated before anything is allocated (a 7B model in fp32 on a laptop would otherwise
start allocating ~30 GB blindly and end in swap or the OOM killer)."""
from __future__ import annotations

import os

import torch

from .config import BagelConfig


class InsufficientMemoryError(MemoryError):
    pass


def weight_bytes(cfg: BagelConfig, dtype: torch.dtype, quantization: str = "none") -> int:
    """Bytes of the model's parameters and buffers in ``dtype`` (floating tensors), built on the meta device.
    ``quantization="fp8"``: the MoT projections count one byte per weight plus an fp32 scale per output channel,
    and one decoder layer's projections in ``dtype`` on top (the model is placed and quantized a layer at a time)."""
    from .expert_pack import ExpertPack
    from .model import BagelModel

    with torch.device("meta"):
        model = BagelModel(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    fp8: set[int] = set()
    layer_float = 0
    if quantization == "fp8":
        for layer in model.language_model.model.layers:
            params = [q for m in layer.modules() for v in vars(m).values() if isinstance(v, ExpertPack)
                      and v.quantizable for q in v._params()]
            fp8.update(id(q) for q in params)
            layer_float = max(layer_float, sum(q.numel() for q in params) * itemsize)
    total = layer_float
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in fp8:
            total += t.numel() + 4 * t.shape[0]
        else:
            total += t.numel() * (itemsize if t.is_floating_point() else t.element_size())
    return total


def available_bytes(device: torch.device | str) -> int | None:
    """Free memory of ``device``: the GPU's free memory, or the host's MemAvailable (None when unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(cfg: BagelConfig, dtype: torch.dtype, device: torch.device | str, copies: int = 1,
               available: int | None = None, quantization: str = "none") -> int:
    """Refuse (``InsufficientMemoryError`` with the numbers) when ``copies`` of the weights cannot fit; returns the
    estimate. Weights only: activations and the KV cache come on top, so passing is necessary, not sufficient.
    ``quantization="fp8"``: FP8 projection weights (``weight_bytes``)."""
    need = weight_bytes(cfg, dtype, quantization) * copies
    have = available if available is not None else available_bytes(device)
    if have is not None and need > have:
        gib = 1024 ** 3
        raise InsufficientMemoryError(
            f"{cfg.name} in {str(dtype).replace('torch.', '')}{' with FP8 projections' if quantization == 'fp8' else ''}"
            f" needs ~{need / gib:.1f} GiB for its weights"
            f"{f' ({copies} copies)' if copies > 1 else ''}, but {torch.device(device)} has {have / gib:.1f} GiB "
            "available; use a smaller dtype (--dtype bf16), a GPU, or the tiny preset")
    return need
