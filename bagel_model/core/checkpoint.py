"""Checkpoint I/O in BAGEL-7B-MoT's released layout.

Directory: ``ema.safetensors`` (everything but the VAE), ``ae.safetensors`` (``encoder.*``, ``decoder.*``),
``config.json``, ``llm_config.json``, ``vit_config.json``, ``model.safetensors.index.json``, ``tokenizer.json``.
Loading is strict: a missing, unexpected or mis-shaped key raises ``CheckpointError`` naming the keys.

FP8 checkpoints (a model run with ``KernelOptions(quantization="fp8")``): ``config.json`` carries
``"quantization": {"method": "fp8", ...}`` (``FP8_CONFIG``), and in ``ema.safetensors`` every MoT projection weight
of both experts (``...self_attn.{q,k,v,o}_proj[_moe_gen].weight``, ``...mlp[_moe_gen].{gate,up,down}_proj.weight``)
is stored as its float8_e4m3fn codes under its usual name, with its fp32 per-output-channel scale beside it as
``<module>.weight_scale`` (shape (out_features,); ``weight ~= codes.float() * weight_scale[:, None]``). Everything
else is stored as in a float checkpoint. Such a checkpoint loads as FP8 without quantizing again (bit for bit); a
missing, mis-shaped or non-finite scale, or a projection stored in another dtype, is a ``CheckpointError`` naming
the tensor.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dataclasses

from bagel_kernels import KernelOptions, default_options, require_fp8_support
from bagel_kernels.fp8_quant import FP8_DTYPE
from .checksums import verify_directory, write_sha256

from .config import BagelConfig
from .model import BagelModel
from .tokenizer import BagelTokenizer

EMA_FILE, AE_FILE, INDEX_FILE = "ema.safetensors", "ae.safetensors", "model.safetensors.index.json"
# config.json's entry for an FP8 checkpoint (module docstring)
FP8_CONFIG = {"method": "fp8", "format": "float8_e4m3fn",
              "weight_scale": "<module>.weight_scale: fp32 per output channel, weight = codes * scale[:, None]",
              "activations": "quantized per row at run time"}


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


# Key re-layout between the model's modules and the release's tensors. The release stores SigLIP's patch embedding
# as the Linear that upstream's ``convert_conv2d_to_linear`` makes of the Conv2d: weight (E, p*p*C) over each patch
# flattened in (row, column, channel) order, i.e. ``conv.permute(0, 2, 3, 1).reshape(E, -1)``. A bare reshape back
# to (E, C, p, p) would scramble it (ViT embeddings off by rel 0.5); the inverse is reshape(E, p, p, C).permute.
_PATCH_EMBED = "embeddings.patch_embedding.weight"


def _is_patch_embed(key: str) -> bool:
    return key.endswith(_PATCH_EMBED)


def _to_release(key: str, value: torch.Tensor) -> torch.Tensor:
    """Model tensor -> the release's layout (Linear patch embedding)."""
    if _is_patch_embed(key) and value.dim() == 4:
        return value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)
    return value


def _from_release(key: str, src: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A stored tensor -> the model's ``shape``; the patch embedding may be stored as the Linear or the Conv2d."""
    if _is_patch_embed(key) and src.dim() == 2 and len(shape) == 4:
        e, c, p, q = shape
        return src.reshape(e, p, q, c).permute(0, 3, 1, 2)
    return src


def save_pretrained(model: BagelModel, directory: str, tokenizer: BagelTokenizer | None = None) -> None:
    os.makedirs(directory, exist_ok=True)
    model.cfg.save(directory)
    if model.is_fp8:  # the flag from_pretrained reads to build the FP8 layout before loading
        path = os.path.join(directory, "config.json")
        with open(path) as f:
            top = json.load(f)
        top["quantization"] = FP8_CONFIG
        with open(path, "w") as f:
            json.dump(top, f, indent=2, sort_keys=True)
    ema, ae = _split_state(model)
    # clone: parameters are views of per-expert packs (bagel_model.core.expert_pack), and safetensors refuses shared storage
    save_file({k: _to_release(k, v.detach().cpu()).contiguous().clone() for k, v in ema.items()},
              os.path.join(directory, EMA_FILE))
    save_file({k: v.detach().contiguous().cpu() for k, v in ae.items()}, os.path.join(directory, AE_FILE))
    total = sum(v.numel() * v.element_size() for v in ema.values())  # a re-layout keeps the element count
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: EMA_FILE for k in sorted(ema)}}, f, indent=1)
    if tokenizer is not None:
        tokenizer.save(directory)
    for name in (EMA_FILE, AE_FILE):  # <file>.sha256: from_pretrained verifies the bytes (sha256sum -c too)
        write_sha256(os.path.join(directory, name))


def _describe(keys, limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _load_file_strict(path: str, expected: dict[str, torch.Tensor], what: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} weights file is missing: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} weights file {path} is empty (0 bytes)")
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # noqa: BLE001 - SafetensorError names neither the file nor what it means
        raise CheckpointError(f"{what} weights file {path} is not a readable safetensors file (truncated or "
                              f"corrupt?): {e}") from None
    with f:
        keys = set(f.keys())
        missing, unexpected = set(expected) - keys, keys - set(expected)
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_describe(missing)}")
            if any(k.endswith(".weight_scale") for k in missing):
                problems.append("an FP8 checkpoint stores each float8 projection weight with its fp32 "
                                "per-output-channel scale <module>.weight_scale")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        shaped = []
        for k in sorted(keys & set(expected)):
            shape = tuple(f.get_slice(k).get_shape())
            want = tuple(expected[k].shape)
            if shape != want and not (_is_patch_embed(k) and shape == _release_shape(want)):
                shaped.append(f"{k}: checkpoint {shape} vs model {want}")
        if shaped:
            problems.append(f"mis-shaped keys ({len(shaped)}): " + "; ".join(shaped[:12]))
        if problems:
            raise CheckpointError(f"{path} does not match the model ({what}): " + " | ".join(problems))
        typed, nonfinite = [], []
        for k, dst in expected.items():
            try:
                src = f.get_tensor(k)
            except Exception as e:  # noqa: BLE001 - a truncated file fails here, per tensor
                raise CheckpointError(f"{path}: tensor {k!r} cannot be read (truncated file?): {e}") from None
            if dst.is_floating_point() != src.is_floating_point():  # e.g. int64 data where a weight belongs
                typed.append(f"{k}: checkpoint {src.dtype} vs model {dst.dtype}")
                continue
            if (dst.dtype == FP8_DTYPE) != (src.dtype == FP8_DTYPE):  # codes without their scale's meaning
                typed.append(f"{k}: checkpoint {src.dtype} vs model {dst.dtype} (FP8 checkpoints store the "
                             f"projection weights, and only them, as {FP8_DTYPE} codes)")
                continue
            if src.is_floating_point() and not bool(torch.isfinite(src.float() if src.dtype == FP8_DTYPE
                                                                   else src).all()):
                nonfinite.append(f"{k} ({int((~torch.isfinite(src)).sum())} of {src.numel()} values)")
                continue
            dst.copy_(_from_release(k, src, dst.shape).to(dst.dtype))
        if typed or nonfinite:
            raise CheckpointError(f"{path} ({what}): " + " | ".join(
                ([f"wrongly typed tensors ({len(typed)}): " + "; ".join(typed[:12])] if typed else [])
                + ([f"non-finite (NaN/Inf) tensors ({len(nonfinite)}): " + _describe(nonfinite)] if nonfinite else [])))


def _release_shape(shape) -> tuple:
    """The release's (Linear) shape of a model Conv2d patch embedding (E, C, p, p): (E, p*p*C). Exact: a tensor of
    the right element count in another shape (transposed) would load scrambled."""
    return (shape[0], _numel(shape[1:])) if len(shape) == 4 else tuple(shape)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def from_pretrained(directory: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    byte_tokenizer: bool = False, check_memory: bool = True,
                    kernels: KernelOptions | None = None) -> tuple[BagelModel, BagelTokenizer]:
    """Load a checkpoint directory strictly; returns the model (eval, no grad; running with ``kernels``) and its
    tokenizer.

    ``byte_tokenizer``: a directory without ``tokenizer.json`` gets the built-in byte-level tokenizer (else that is
    an error). ``check_memory``: refuse, with the number, when the weights cannot fit on ``device``."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r}")
    _, bad_sums = verify_directory(directory, INDEX_FILE)  # only where the directory carries checksums
    if bad_sums:
        raise CheckpointError(f"checkpoint {directory!r} fails its checksums: " + "; ".join(bad_sums))
    cfg = BagelConfig.from_pretrained(directory)
    fp8 = _stored_fp8(directory)
    if fp8:  # the codes cannot be turned back into the float weights: an FP8 checkpoint always runs FP8
        kernels = dataclasses.replace(kernels if kernels is not None else default_options(), quantization="fp8")
    require_fp8_support(kernels, device, dtype)  # before anything is loaded
    tokenizer = BagelTokenizer.from_directory(directory, byte_fallback=byte_tokenizer)  # before the weights load
    if check_memory:
        from .memory import check_fits

        check_fits(cfg, dtype, "cpu")  # loaded on the host first
        if torch.device(device).type == "cuda":  # placed layer by layer: FP8 arrives quantized
            check_fits(cfg, dtype, device, quantization=(kernels or default_options()).quantization)
    with torch.device("meta"):
        model = BagelModel(cfg, kernels)
    model = model.to_empty(device="cpu")
    model.to_dtype(dtype)
    if fp8:
        model.make_fp8_storage()
    ema, ae = _split_state(model)
    with torch.no_grad():
        _load_file_strict(os.path.join(directory, EMA_FILE), ema, "model (ema)")
        _load_file_strict(os.path.join(directory, AE_FILE), ae, "VAE")
        model.reset_position_ids()
    model.eval().requires_grad_(False)
    return model.place(device), tokenizer


def _stored_fp8(directory: str) -> bool:
    """Whether config.json marks the checkpoint FP8 (``FP8_CONFIG``); an unknown method is an error."""
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        q = json.load(f).get("quantization")
    if q is None:
        return False
    method = q.get("method") if isinstance(q, dict) else q
    if method in ("none", None):
        return False
    if method != "fp8":
        raise CheckpointError(f"{path}: unknown quantization {q!r}; this loader reads 'fp8' checkpoints "
                              f"(quantization.method) and float ones")
    return True
