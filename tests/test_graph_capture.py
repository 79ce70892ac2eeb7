"""``runtime.graph_capture.capture``: how a CUDA graph is recorded (CPU-checkable with stand-ins for the CUDA calls;
the GPU tests replay real graphs: tests/test_packed_step.py, tests/test_two_stage.py)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from bagel_model.engine.step import PackedStep
from bagel_model.runtime import graph_capture
from parallel.denoise import ParallelStep


class _Stream:
    def __init__(self, name: str, log: list):
        self.name, self.log, self.device = name, log, "cuda:0"

    def wait_stream(self, other: "_Stream") -> None:
        self.log.append(f"{self.name} waits for {other.name}")


class _Graph:
    def __init__(self, log: list):
        self.log = log

    def capture_begin(self, pool=None) -> None:
        self.log.append(f"begin pool={pool}")

    def capture_end(self) -> None:
        self.log.append("end")


@pytest.fixture
def cuda_stand_ins(monkeypatch):
    log: list[str] = []
    current = _Stream("current", log)

    @contextlib.contextmanager
    def on(stream):
        log.append(f"on {stream.name}")
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: log.append("synchronize"))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a, **k: log.append("empty_cache"))
    return log


def test_capture_records_on_a_side_stream_ordered_after_the_current_one_without_a_device_sync(cuda_stand_ins):
    log = cuda_stand_ins
    side = _Stream("side", log)
    out = graph_capture.capture(_Graph(log), lambda: log.append("forward") or "static out", pool="P", stream=side)
    assert out == "static out"
    assert log == ["side waits for current", "on side", "begin pool=P", "forward", "end", "current waits for side"]


def test_capture_can_synchronize_first_and_always_ends_the_capture(cuda_stand_ins):
    log = cuda_stand_ins

    def fails():
        raise RuntimeError("a kernel that cannot be captured")

    with pytest.raises(RuntimeError, match="cannot be captured"):
        graph_capture.capture(_Graph(log), fails, stream=_Stream("side", log), synchronize=True)
    assert log[0] == "synchronize" and log[-1] == "end" and "empty_cache" not in log


def test_only_the_engine_whose_graphs_hold_collectives_synchronizes_before_capturing():
    assert ParallelStep.captures_collectives and not PackedStep.captures_collectives
