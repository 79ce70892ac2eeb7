"""KernelOptions: which implementation runs each op, and the few knobs the kernels have.

Passed explicitly: every kernel entry point takes ``options: KernelOptions | None = None``; the model carries one
(``BagelModel.kernels``) and hands it to every kernel call of a forward. ``None`` means the process default,
``default_options()``: ``KernelOptions()`` unless the environment override (README, "Kernel options") says
otherwise. The environment is read once, here, and nowhere else in the library.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, fields
from typing import Literal, Mapping

Backend = Literal["auto", "reference", "triton", "gluon"]
Mode = Literal["exact", "fast"]
Schedule = Literal["auto", "segment", "chained"]
Quantization = Literal["none", "fp8"]
Fp8ActivationScaling = Literal["row", "qkv_bound", "group128", "tensor"]
Fp8Accumulation = Literal["promoted", "fast"]

BACKENDS: tuple[str, ...] = ("auto", "reference", "triton", "gluon")
MODES: tuple[str, ...] = ("exact", "fast")
SCHEDULES: tuple[str, ...] = ("auto", "segment", "chained")
QUANTIZATIONS: tuple[str, ...] = ("none", "fp8")
FP8_ACTIVATION_SCALINGS: tuple[str, ...] = ("row", "qkv_bound", "group128", "tensor")
FP8_ACCUMULATIONS: tuple[str, ...] = ("promoted", "fast")

# The documented environment override: variable -> field. Nothing else in the library reads the environment.
ENV_OVERRIDE = {"BAGEL_KERNELS_BACKEND": "backend", "BAGEL_KERNELS_MODE": "mode"}


@dataclass(frozen=True)
class KernelOptions:
    """- ``backend``: "auto" (default) — CUDA tensors run the Triton kernels, and on Hopper with 16-bit inputs the
      warp-specialized Gluon kernels wherever they cover the call (same bits as Triton); CPU tensors run the
      plain-torch references. "reference": the plain-torch references everywhere. "triton": the Triton kernels
      only, never Gluon (on CPU tensors only under the Triton interpreter, ``TRITON_INTERPRET=1``, as the tests
      run them). "gluon": "auto" on CUDA, an error on CPU tensors.
    - ``mode``: "exact" (default) — every projection is the batch-invariant routed GEMM, so sequence-parallel runs
      reproduce one device bit for bit. "fast" — dense projections call cuBLAS where it wins; cuBLAS picks its
      algorithm from the row count, so the output bits change and parallel runs match one device only to rounding.
    - ``attention_schedule``: the Gluon attention's issue order of key blocks ("auto" | "segment" | "chained");
      changes no bit.
    - ``decode_graph``: replay the greedy text-decoding step from a CUDA graph (CUDA only); changes no bit.
    - ``quantization``: "none" (default) — the projections run in the activation dtype. "fp8" — every MoT
      projection of both experts (QKV, o_proj, gate/up, down) keeps float8_e4m3fn weights with per-output-channel
      fp32 scales (quantized once, when the model's packs are built) and quantizes its input per row before the
      FP8 routed GEMM (``bagel_kernels.routed_linear_fp8``). Its own exactness class: batch-invariant and
      parallel-exact among FP8 runs, but other output bits than "none". On CUDA it needs compute capability >= 8.9.
    - ``fp8_activation_scaling``: how ``quantization="fp8"`` scales each projection's input (weights are per output
      channel whatever this says). "row" — one scale per row: batch-invariant. "qkv_bound" (default) — the QKV
      projection's input (its RMSNorm's output) with a static scale per expert, ``fp8_quant.norm_bound_scale``
      (sqrt(K) max|norm weight| / 448, a bound no normalized row can pass), every other input per row: a constant,
      so batch-invariant too, and every token rounds on one grid, as with per-tensor scaling (benchmarks/RESULTS.md
      compares them). "group128" — one scale per 1 x 128 slice of a row along K (DeepSeek-V3 style): row-local, so
      batch-invariant too. "tensor" — one scale over all rows of the launch (what per-tensor FP8 deployments ship):
      NOT batch-invariant (a row's codes depend on the other rows of the batch); a comparison mode for accuracy
      studies (``scripts/fp8_accuracy_report.py``, ``benchmarks/bench_fp8_e2e``), not for serving. "row",
      "qkv_bound" and "tensor" run every backend; "group128" the plain-torch reference only (CPU tensors, or
      ``backend="reference"``): a call with another backend raises NotImplementedError. Ignored when
      ``quantization="none"``.
    - ``fp8_accumulation``: how the GPU's FP8 GEMM sums along K. "fast" (default) — the whole K loop in the tensor
      core's accumulator (what ``torch._scaled_mm(use_fast_accum=True)`` and the FP8 GEMMs of serving stacks do):
      1.18-1.45x the promoted GEMM on an H100, 1024² text to image 6.4 s against 8.1 s, at 0.2-0.4 % more relative
      GEMM error, an order of magnitude below the e4m3 rounding's own (benchmarks/RESULTS.md). "promoted" — each
      128-wide K step in the MMA's accumulator, then an fp32 add per step (DeepSeek-V3's promotion: Hopper's FP8 MMA
      keeps fewer than fp32's bits while it accumulates). Each is its own exactness class on the GPU (still batch-
      and parallel-invariant: the accumulation is fixed per weight shape); the CPU reference sums in fp32 either
      way. Ignored when ``quantization="none"``.
    """

    backend: Backend = "auto"
    mode: Mode = "exact"
    attention_schedule: Schedule = "auto"
    decode_graph: bool = True
    quantization: Quantization = "none"
    fp8_activation_scaling: Fp8ActivationScaling = "qkv_bound"
    fp8_accumulation: Fp8Accumulation = "fast"

    def __post_init__(self) -> None:
        for name, allowed in (("backend", BACKENDS), ("mode", MODES), ("attention_schedule", SCHEDULES),
                              ("quantization", QUANTIZATIONS),
                              ("fp8_activation_scaling", FP8_ACTIVATION_SCALINGS),
                              ("fp8_accumulation", FP8_ACCUMULATIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown kernel {name.replace('_', ' ')} {value!r}; expected one of {allowed}")
        if not isinstance(self.decode_graph, bool):
            raise TypeError(f"decode_graph must be a bool, got {self.decode_graph!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KernelOptions":
        """Defaults with the documented override (``ENV_OVERRIDE``) applied from ``environ`` (``os.environ``)."""
        env = os.environ if environ is None else environ
        known = {f.name for f in fields(cls)}
        given = {field: env[var] for var, field in ENV_OVERRIDE.items() if env.get(var) and field in known}
        return cls(**given)


@functools.lru_cache(maxsize=1)
def default_options() -> KernelOptions:
    """The process default (what ``options=None`` means): read from the environment once, on first use."""
    return KernelOptions.from_env()


def resolve_options(options: KernelOptions | None) -> KernelOptions:
    if options is None:
        return default_options()
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a KernelOptions, got {type(options).__name__}")
    return options
