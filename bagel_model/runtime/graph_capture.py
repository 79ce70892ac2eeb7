"""Recording a CUDA graph without ``torch.cuda.graph``'s entry costs.

``torch.cuda.graph`` begins every capture with ``torch.cuda.synchronize()`` and ``torch.cuda.empty_cache()``. The
packed step captures each new job layout (every new prompt length) in the middle of a request, and the decode
loop captures its token step once per request; there the synchronize idles the GPU while the host records (a
capture runs nothing), and emptying the allocator's cache returns the request's warm blocks to the driver, so the
allocations after it go back to ``cudaMalloc``. ``capture`` records on a side stream that first waits for the
current one — the graph's inputs, written there, are ordered before its replay on the current stream either way —
so the GPU keeps working through what is queued while the host records. Replays run the very kernels of the
capture, so what they compute does not depend on how the capture began.
"""
from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def capture(graph: torch.cuda.CUDAGraph, fn: Callable[[], T], pool=None,
            stream: torch.cuda.Stream | None = None, synchronize: bool = False) -> T:
    """Record ``fn()`` into ``graph`` (in ``pool``, a ``torch.cuda.graph_pool_handle()``, or the graph's own) on
    ``stream`` (a side stream: a new one if None) and return what ``fn`` returned (the graph's static outputs).
    ``synchronize``: wait for the device first, as ``torch.cuda.graph`` does — for forwards whose collectives
    (NCCL) are captured too, whose streams should hold no eager work when they join a capture (not measured on
    several GPUs here, so those keep the conservative entry)."""
    if synchronize:
        torch.cuda.synchronize()
    current = torch.cuda.current_stream()
    side = stream if stream is not None else torch.cuda.Stream(device=current.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        graph.capture_begin(pool=pool)
        try:
            out = fn()
        finally:
            graph.capture_end()
    current.wait_stream(side)
    return out
