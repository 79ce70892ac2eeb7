"""What every benchmark shares: the environment facts of a row, the timers, and the one results table.

Every ``bench_*.py`` appends its measurements to ``benchmarks/results.csv`` through ``write_rows``: one row per
(subject, shape, metric) with the device, torch, Triton, commit and date it ran on, and, where the row compares
against a peer (cuDNN, cuBLAS, ...), the peer's name and ours / peer.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import os
import subprocess
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


def row(subject: str, shape: str, metric: str, value: float, peer: str = "", peer_value: float | None = None
        ) -> dict:
    """One measurement; with ``peer_value`` (the peer's value of the same metric) the row carries ours / peer."""
    ratio = "" if peer_value in (None, 0) else round(value / peer_value, 4)
    return {"subject": subject, "shape": shape, "metric": metric, "value": round(value, 4), "peer": peer,
            "ratio": ratio}


def write_rows(rows: Iterable[dict], path: str | os.PathLike | None = None) -> int:
    """Append ``rows`` (``row(...)`` dicts; environment fields filled in where missing) to the results table,
    writing its header if the file is new. Returns how many rows were written."""
    path = Path(path) if path is not None else RESULTS_CSV
    env = environment()
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


def emit(rows: list[dict], args: argparse.Namespace) -> None:
    for r in rows:
        print(r, flush=True)
    if not args.no_csv:
        print(f"{write_rows(rows, args.csv)} rows -> {args.csv}")


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise SystemExit(f"{what} runs on a CUDA GPU; none is visible")


def bench_ms(fn: Callable[[], object], graph: bool = True) -> float:
    """Median milliseconds of ``fn``: CUDA-graph replay (GPU time without Python launch overhead, what a kernel
    costs inside a busy step whose launches run ahead of the GPU) or ``do_bench`` (launch overhead included)."""
    if graph:
        with torch.cuda.stream(torch.cuda.Stream()):
            return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")
