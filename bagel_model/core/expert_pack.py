"""Per-expert parameter packing for the routed kernels, without a second copy of the weights.

The routed GEMM reads one ``(E, P, N, K)`` tensor (experts x parts x fused output rows x K). The model keeps the
released module layout (``q_proj``, ``k_proj_moe_gen``, ... so checkpoints load by name); ``ExpertPack`` stacks those
parameters into one tensor and re-points every parameter's ``.data`` at its view of it, so the memory is not
duplicated and ``load_state_dict``/``copy_`` keep writing the packed storage. A move or cast of the module
re-allocates the parameters; the pack notices (data pointers changed) and rebuilds on next use.
"""
from __future__ import annotations

import torch
from torch import nn


class ExpertPack:
    """``layout[e][p]`` lists ``(module, attribute)`` of the parameters concatenated along dim 0 for expert ``e``,
    part ``p``. Parameters are looked up on every use: ``to_empty``/``load`` may replace the Parameter objects."""

    def __init__(self, layout: list[list[list[tuple[nn.Module, str]]]]):
        self._layout = layout
        shapes = {tuple(sum(q.shape[0] for q in part) for part in parts) for parts in self._resolved()}
        if len(shapes) != 1:
            raise ValueError(f"ExpertPack: experts' parts differ in size: {sorted(shapes)}")
        self._packed: torch.Tensor | None = None
        self._ptrs: tuple[int, ...] = ()

    def _resolved(self) -> list[list[list[nn.Parameter]]]:
        return [[[getattr(m, a) for m, a in part] for part in parts] for parts in self._layout]

    def _params(self) -> list[nn.Parameter]:
        return [q for parts in self._resolved() for part in parts for q in part]

    def _current(self) -> bool:
        return self._packed is not None and tuple(q.data_ptr() for q in self._params()) == self._ptrs

    def get(self) -> torch.Tensor:
        """The packed tensor (E, P, N, *rest); rebuilt if the parameters were moved, cast or replaced."""
        if not self._current():
            self._build()
        return self._packed

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
        self._packed = packed
        self._ptrs = tuple(q.data_ptr() for q in self._params())
