"""End to end: one text2img request through both stages in one process (``BagelPipeline.generate``: prefill of the
CFG contexts, the denoise loop, the VAE decode), seconds per request after a warm-up request, and the seconds per
denoise step it implies. Runs on CPU with the tiny preset. (The packed denoise step alone: ``bench_step``.)

``--quantization none fp8`` times each projection mode in turn in the same run (one model loaded at a time), the
first named being the peer of the others: FP8 (issue #30) against bf16 exact. FP8's accuracy against bf16 and its
activation-scaling variants: ``bench_fp8_e2e``.

    python -m benchmarks.bench_generate --preset bagel-7b-mot --device cuda --size 1024 --steps 50 [--kernels fast]
        [--quantization none fp8]
"""
from __future__ import annotations

import argparse
import gc
import time

import torch

from bagel_kernels import KernelOptions
from bagel_model.core.sampling import SamplingParams
from bagel_model.pipeline import BagelPipeline
from bagel_model.serving.split import ModelSpec
from bagel_model.serving.stages import Request

from .common import add_output_args, emit, row


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3, help="timed requests (median)")
    ap.add_argument("--kernels", choices=["exact", "fast"], default="exact", help="kernel mode (fast changes bits)")
    ap.add_argument("--quantization", nargs="+", choices=["none", "fp8"], default=["none"],
                    help="projection modes to time in turn; the first is the peer of the others (fp8: issue #30)")
    return add_output_args(ap)


def time_requests(a: argparse.Namespace, quantization: str) -> tuple[float, set[str]]:
    """Median seconds per request of one projection mode after a warm-up request, and the image md5s it gave."""
    dtype = "bfloat16" if a.device.startswith("cuda") else "float32"
    spec = ModelSpec(preset=a.preset, dtype=dtype, device=a.device,
                     kernels=KernelOptions(mode=a.kernels, quantization=quantization))
    model, tok = spec.load()
    pipe = BagelPipeline(model, tok)

    def request(steps: int) -> Request:
        return Request("text2img", "a photo of a red cube on a wooden table",
                       SamplingParams(steps=steps, height=a.size, width=a.size))

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    pipe.generate(request(2))  # warm-up: kernel compilation, allocator
    times, md5s = [], set()
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        _, result = pipe.generate(request(a.steps))
        sync()
        times.append(time.perf_counter() - t0)
        md5s.add(result.image_md5)
    del pipe, model  # one model on the device at a time
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return sorted(times)[len(times) // 2], md5s


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    if len(set(a.quantization)) != len(a.quantization):
        raise SystemExit(f"bench_generate: --quantization names a mode twice: {a.quantization}")
    shape = f"{a.preset} {a.size}² text2img, {a.steps} steps, {a.kernels} kernels on {a.device}"
    rows, peer = [], ("", None)  # (name, s/request) of the first mode
    for q in a.quantization:
        s, md5s = time_requests(a, q)
        same = "same image every run" if len(md5s) == 1 else "IMAGE CHANGED between runs"
        name = "generate end to end" + ("" if q == "none" else f", {q}")
        rows += [row(f"{name} ({same})", shape, "s/request", s, *peer),
                 row(name, shape, "s/step (request / steps)", s / a.steps)]
        peer = peer if peer[1] is not None else (name, s)
    emit(rows, a)


if __name__ == "__main__":
    main()
