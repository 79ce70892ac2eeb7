"""Checkpoint I/O in BAGEL-7B-MoT's released layout.

Directory: ``ema.safetensors`` (everything but the VAE), ``ae.safetensors`` (``encoder.*``, ``decoder.*``),
``config.json``, ``llm_config.json``, ``vit_config.json``, ``model.safetensors.index.json``, ``tokenizer.json``.
Loading is strict: a missing, unexpected or mis-shaped key raises ``CheckpointError`` naming the keys.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bagel_kernels import KernelOptions

from .config import BagelConfig
from .model import BagelModel
from .tokenizer import BagelTokenizer

EMA_FILE, AE_FILE, INDEX_FILE = "ema.safetensors", "ae.safetensors", "model.safetensors.index.json"


class CheckpointError(ValueError):
    pass


def _split_state(model: BagelModel) -> tuple[dict, dict]:
    ema, ae = {}, {}
    for k, v in model.state_dict().items():
        if k.startswith("vae."):
            ae[k[len("vae."):]] = v
        elif not k.endswith("position_ids"):  # SigLIP's arange buffer is rebuilt, not stored
            ema[k] = v
    return ema, ae


def save_pretrained(model: BagelModel, directory: str, tokenizer: BagelTokenizer | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    model.cfg.save(directory)
    ema, ae = _split_state(model)
    # clone: parameters are views of per-expert packs (bagel_model.packing), and safetensors refuses shared storage
    save_file({k: v.detach().cpu().clone() for k, v in ema.items()}, os.path.join(directory, EMA_FILE))
    save_file({k: v.detach().contiguous().cpu() for k, v in ae.items()}, os.path.join(directory, AE_FILE))
    total = sum(v.numel() * v.element_size() for v in ema.values())
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: EMA_FILE for k in sorted(ema)}}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save(directory)


def _describe(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_file_strict(path: str, expected: dict[str, torch.Tensor], what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file is missing: {path}")
    with safe_open(path, framework="pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = set(expected) - keys, keys - set(expected)
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        shaped = []
        for k in sorted(keys & set(expected)):
            shape = tuple(f.get_slice(k).get_shape())
            want = tuple(expected[k].shape)
            if shape != want and not (k.endswith("patch_embedding.weight") and _numel(shape) == _numel(want)):
                shaped.append(f"{k}: checkpoint {shape} vs model {want}")
        if shaped:
            problems.append(f"mis-shaped keys ({len(shaped)}): " + "; ".join(shaped[:12]))
        if problems:
            raise CheckpointError(f"{path} does not match the model ({what}): " + " | ".join(problems))
        for k, dst in expected.items():
            src = f.get_tensor(k)
            # The release may store SigLIP's patch embedding as a Linear (E, C*P*P); ours is the Conv2d view of it.
            dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def from_pretrained(directory: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    kernels: KernelOptions | None = None) -> tuple[BagelModel, BagelTokenizer]:
    """Load a checkpoint directory strictly; returns the model (eval, no grad; running with ``kernels``) and its
    tokenizer."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r}")
    cfg = BagelConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = BagelModel(cfg, kernels)
    model = model.to_empty(device="cpu")
    model.to_dtype(dtype)
    ema, ae = _split_state(model)
    with torch.no_grad():
        _load_file_strict(os.path.join(directory, EMA_FILE), ema, "model (ema)")
        _load_file_strict(os.path.join(directory, AE_FILE), ae, "VAE")
        model.reset_position_ids()
    model.eval().requires_grad_(False)
    return model.to(device).pack_experts(), BagelTokenizer.from_directory(directory)
