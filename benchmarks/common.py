"""What every benchmark shares: the environment facts of a row, the timers, and the one results table.

Every ``bench_*.py`` appends its measurements to ``benchmarks/results.csv`` through ``write_rows``: one row per
(subject, shape, metric) with the device, torch, Triton, commit and date it ran on, and, where the row compares
against a peer (cuDNN, cuBLAS, ...), the peer's name and ``ratio``.

``ratio`` has one meaning everywhere (this table, every benchmark's JSON, RESULTS.md): the SPEEDUP of ours over the
peer, > 1 = ours faster. ``row`` derives it from the metric's direction (``higher_is_better``): for a time-like
metric (ms, s, ms/token, s/image, ...) it is peer / ours, for a throughput-like one (TFLOP/s, GB/s, tokens/s) ours /
peer.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

RESULTS_CSV = Path(__file__).resolve().with_name("results.csv")
FIELDS = ("device", "torch", "triton", "commit", "date", "subject", "shape", "metric", "value", "peer", "ratio")


def commit() -> str:
    """The checkout's short commit, ``+dirty`` when the tree has changes (a row must name the code it measured)."""
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def environment() -> dict[str, str]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "torch": torch.__version__, "triton": triton.__version__, "commit": commit(),
            "date": datetime.date.today().isoformat()}


_TIME_UNITS = re.compile(r"^(ms|s|us|µs|sec|seconds?)(/.*)?$")


def higher_is_better(metric: str) -> bool:
    """The direction of ``metric``: True for throughput-like units (``.../s``: TFLOP/s, GB/s, tokens/s), False for
    time-like ones (a word ``ms``, ``s``, ``us`` or ``seconds``, alone or per something: ms, s/image, ms/token,
    "s to KV forwarded"). Any other metric (GPU busy, peak GiB) has no direction: a ``ValueError``, so a row
    never carries a ratio whose meaning is a guess."""
    words = metric.split()
    if any(w.endswith("/s") for w in words):
        return True
    if any(_TIME_UNITS.match(w) for w in words):
        return False
    raise ValueError(f"metric {metric!r} is neither time-like nor throughput-like: no speedup ratio for it")


def speedup(metric: str, value: float, peer_value: float) -> float:
    """The speedup of ours (``value``) over the peer (``peer_value``) in ``metric``: > 1 = ours faster."""
    return value / peer_value if higher_is_better(metric) else peer_value / value


def row(subject: str, shape: str, metric: str, value: float, peer: str = "", peer_value: float | None = None
        ) -> dict:
    """One measurement; with ``peer_value`` (the peer's value of the same metric) the row carries ``ratio``, the
    speedup of ours over the peer (``speedup``: > 1 = ours faster)."""
    ratio = "" if peer_value in (None, 0) or value == 0 else round(speedup(metric, value, peer_value), 4)
    return {"subject": subject, "shape": shape, "metric": metric, "value": round(value, 4), "peer": peer,
            "ratio": ratio}


def write_rows(rows: Iterable[dict], path: str | os.PathLike | None = None, env: dict[str, str] | None = None
               ) -> int:
    """Append ``rows`` (``row(...)`` dicts; environment fields -- ``env``, or ``environment()`` read now -- filled in
    where missing) to the results table, writing its header if the file is new. Returns how many rows were
    written."""
    path = Path(path) if path is not None else RESULTS_CSV
    env = env if env is not None else environment()
    rows = [{**env, **r} for r in rows]
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="raise")
        if new:
            w.writeheader()
        w.writerows(rows)
    return len(rows)


def add_output_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--csv", default=str(RESULTS_CSV), help="results table to append the rows to")
    p.add_argument("--no-csv", action="store_true", help="print the rows only")
    return p


def emit(rows: Iterable[dict], args: argparse.Namespace) -> None:
    """Print and append each row as it arrives (a generator's rows land one by one, so a run cut short by a
    time limit keeps what it measured)."""
    n, env = 0, None
    for r in rows:
        print(r, flush=True)
        if not args.no_csv:
            env = env or environment()  # once per run: it asks git for the commit
            n += write_rows([r], args.csv, env)
    if not args.no_csv:
        print(f"{n} rows -> {args.csv}", flush=True)


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} runs on a CUDA GPU; none is visible")


def _kind(name: str) -> str:
    n = name.lower()
    if "nccl" in n:
        return "communication"
    if "gemm" in n or "nvjet" in n or "cutlass" in n:
        return "GEMM"
    if "attn" in n or "flash" in n or "fmha" in n:
        return "attention"
    return "other"


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def kernel_breakdown(fn: Callable[[], object], iters: int = 3) -> dict[str, float]:
    """Where ``fn``'s wall time goes on the GPU (profiler over ``iters`` calls after a synchronize), in ms per call:
    kernel time by kind (GEMM, attention, communication = NCCL kernels, other), ``busy`` (time any kernel runs),
    ``wall``, ``idle`` (wall - busy) and ``exposed_comm`` (time only communication kernels run: what overlap could
    still hide). Kernels replayed from CUDA graphs are included."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        w0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - w0) * 1e3
    spans: dict[str, list[tuple[float, float]]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.elapsed_us() > 0:
            spans.setdefault(_kind(e.name), []).append((e.time_range.start / 1e3, e.time_range.end / 1e3))
    return summarize_spans(spans, wall, iters)


def summarize_spans(spans: dict[str, list[tuple[float, float]]], wall_ms: float, iters: int) -> dict[str, float]:
    """``kernel_breakdown``'s arithmetic on kernel (start, end) spans in ms grouped by kind, per call."""
    out = {k: sum(b - a for a, b in v) / iters for k, v in spans.items()}
    busy = _union([s for v in spans.values() for s in v])
    compute = _union([s for k, v in spans.items() if k != "communication" for s in v])
    comm = _union(spans.get("communication", []))
    hidden = sum(max(0.0, min(b, d) - max(a, c)) for a, b in comm for c, d in compute)
    out.update(busy=sum(b - a for a, b in busy) / iters, wall=wall_ms / iters,
               exposed_comm=(sum(b - a for a, b in comm) - hidden) / iters)
    out["idle"] = out["wall"] - out["busy"]
    return {k: round(v, 3) for k, v in out.items()}


def bench_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median milliseconds of ``fn``: CUDA-graph replay (GPU time without Python launch overhead, what a kernel
    costs inside a busy step whose launches run ahead of the GPU) or ``do_bench`` (launch overhead included)."""
    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")
