"""Per-expert parameter packing for the routed kernels, without a second copy of the weights.

The routed GEMM reads one ``(E, P, N, K)`` tensor (experts x parts x fused output rows x K). The model keeps the
released module layout (``q_proj``, ``k_proj_moe_gen``, ... so checkpoints load by name); ``ExpertPack`` stacks those
parameters into one tensor and re-points every parameter's ``.data`` at its view of it, so the memory is not
duplicated and ``load_state_dict``/``copy_`` keep writing the packed storage. A move or cast of the module
re-allocates the parameters; the pack notices (data pointers changed) and rebuilds on next use.

FP8 (``KernelOptions(quantization="fp8")``; only packs made with ``quantizable=True``: the MoT projections):
``get_fp8()`` quantizes the packed weight once per output channel (``bagel_kernels.fp8_quant.quantize_channels``)
and re-points every parameter at its view of the float8_e4m3fn codes — the float copy is dropped — and registers
on each parameter's module a buffer ``<attr>_scale`` (``weight_scale``: fp32, one per output row of that parameter)
viewing the packed (E, P, N) scales. So ``state_dict`` holds the codes under the weight's own name and the scale
beside it, and a model whose parameters are already codes (an FP8 checkpoint, a moved model) is packed without
quantizing again.
"""
from __future__ import annotations

import torch
from torch import nn

from bagel_kernels.fp8_quant import FP8_DTYPE, quantize_channels


class ExpertPack:
    """``layout[e][p]`` lists ``(module, attribute)`` of the parameters concatenated along dim 0 for expert ``e``,
    part ``p``. Parameters are looked up on every use: ``to_empty``/``load`` may replace the Parameter objects."""

    def __init__(self, layout: list[list[list[tuple[nn.Module, str]]]], quantizable: bool = False):
        self._layout = layout
        self.quantizable = quantizable
        shapes = {tuple(sum(q.shape[0] for q in part) for part in parts) for parts in self._resolved()}
        if len(shapes) != 1:
            raise ValueError(f"ExpertPack: experts' parts differ in size: {sorted(shapes)}")
        self._packed: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None  # (E, P, N) fp32 when the pack holds FP8 codes
        self._ptrs: tuple[int, ...] = ()

    def _resolved(self) -> list[list[list[nn.Parameter]]]:
        return [[[getattr(m, a) for m, a in part] for part in parts] for parts in self._layout]

    def _params(self) -> list[nn.Parameter]:
        return [q for parts in self._resolved() for part in parts for q in part]

    def _scales(self) -> list[torch.Tensor]:
        return [getattr(m, a + "_scale") for parts in self._layout for part in parts for m, a in part]

    def _pointers(self) -> tuple[int, ...]:
        ptrs = tuple(q.data_ptr() for q in self._params())
        return ptrs + (tuple(s.data_ptr() for s in self._scales()) if self.is_fp8 else ())

    def _current(self) -> bool:
        return self._packed is not None and self._pointers() == self._ptrs

    @property
    def is_fp8(self) -> bool:
        """Whether the parameters hold FP8 codes (quantized, or loaded from an FP8 checkpoint)."""
        m, a = self._layout[0][0][0]
        return getattr(m, a).dtype == FP8_DTYPE

    def get(self) -> torch.Tensor:
        """The packed tensor (E, P, N, *rest); rebuilt if the parameters were moved, cast or replaced."""
        if self.is_fp8:
            raise RuntimeError("this projection's weights are FP8 codes (the model was built or loaded with "
                               "KernelOptions(quantization='fp8')); run it with quantization='fp8'")
        if not self._current():
            self._build()
        return self._packed

    def get_fp8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed FP8 weight: codes (E, P, N, K) float8_e4m3fn and scales (E, P, N) fp32. Quantizes (once,
        dropping the float copy) if the parameters are still floating point; rebuilt if they moved."""
        if not self.quantizable:
            raise RuntimeError("ExpertPack: this pack is not an FP8 projection (quantizable=False)")
        if not self.is_fp8:
            self._quantize()
        elif not self._current():
            self._build()
        return self._packed, self._scale

    @torch.no_grad()
    def make_fp8_storage(self, device: torch.device | str = "cpu") -> None:
        """Replace the parameters by empty FP8 codes and register empty fp32 ``<attr>_scale`` buffers (uninitialized):
        the layout of an FP8 checkpoint, for the strict loader to fill. No-op if the pack is FP8 already."""
        if self.is_fp8:
            return
        for parts in self._layout:
            for part in parts:
                for m, a in part:
                    old = getattr(m, a)
                    setattr(m, a, nn.Parameter(torch.empty(old.shape, dtype=FP8_DTYPE, device=device),
                                               requires_grad=False))
                    m.register_buffer(a + "_scale", torch.empty(old.shape[0], dtype=torch.float32, device=device))
        self._packed, self._scale, self._ptrs = None, None, ()

    @torch.no_grad()
    def _quantize(self) -> None:
        """Pack the floating-point parameters, quantize per output channel, re-point parameters and scales."""
        self._build()
        codes, scale = quantize_channels(self._packed)
        self._packed = None  # the float pack goes as soon as nothing points at it
        for e, parts in enumerate(self._layout):
            for p, part in enumerate(parts):
                row = 0
                for m, a in part:
                    q = getattr(m, a)
                    n = q.shape[0]
                    q.data = codes[e, p, row:row + n]
                    m.register_buffer(a + "_scale", scale[e, p, row:row + n])
                    row += n
        self._packed, self._scale = codes, scale
        self._ptrs = self._pointers()

    @torch.no_grad()
    def _build(self) -> None:
        layout = self._resolved()
        first = layout[0][0][0]
        rest = tuple(first.shape[1:])
        n = sum(q.shape[0] for q in layout[0][0])
        packed = torch.empty(len(layout), len(layout[0]), n, *rest, dtype=first.dtype, device=first.device)
        for e, parts in enumerate(layout):
            for p, part in enumerate(parts):
                row = 0
                for q in part:
                    if q.dtype != first.dtype or q.device != first.device or tuple(q.shape[1:]) != rest:
                        raise ValueError("ExpertPack: parameters differ in dtype, device or trailing shape")
                    view = packed[e, p, row:row + q.shape[0]]
                    view.copy_(q.data)
                    q.data = view
                    row += q.shape[0]
        self._packed, self._scale = packed, None
        if first.dtype == FP8_DTYPE:  # codes: pack their scales the same way (the module buffers become views)
            scale = torch.empty(packed.shape[:3], dtype=torch.float32, device=first.device)
            for e, parts in enumerate(self._layout):
                for p, part in enumerate(parts):
                    row = 0
                    for m, a in part:
                        s, n = getattr(m, a + "_scale"), getattr(m, a).shape[0]
                        if tuple(s.shape) != (n,) or s.dtype != torch.float32 or s.device != first.device:
                            raise ValueError(f"ExpertPack: the FP8 weight's scale {a}_scale must be fp32 ({n},) on "
                                             f"{first.device}, got {s.dtype} {tuple(s.shape)} on {s.device}")
                        view = scale[e, p, row:row + n]
                        view.copy_(s)
                        m.register_buffer(a + "_scale", view)
                        row += n
            self._scale = scale
        self._ptrs = self._pointers()
