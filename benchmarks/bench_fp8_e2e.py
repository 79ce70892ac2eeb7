"""FP8 end to end (issue #30): text to image through ``pipe(...)`` with FP8 projections against bf16 exact in the
same process — seconds per image after a warm-up request (a new prompt: its context length makes new step layouts,
whose CUDA graphs the request captures, as a user's new prompt does; then the same request again, its layouts
captured, which must give the same bits), GPU memory (after the model is built, the build's peak, the
generation's peak), and the FP8 image's distance from bf16's (final-latent relative error, decoded PSNR/SSIM) on the
preset's random weights. Modes: ``none`` (bf16 exact, the peer), ``fp8`` (the defaults: fast accumulation,
"qkv_bound" activation scaling), ``fp8-promoted`` (``KernelOptions(fp8_accumulation="promoted")``), and for issue #30's
accuracy gate ``fp8-row`` (every activation per row) and ``fp8-tensor`` (one scale per launch: what per-tensor FP8
deployments ship; not batch-invariant). ``--outliers``: the gate's case (b), residual-stream outlier channels — the
output rows ``OUTLIER_CHANNELS`` of every layer's o_proj and down_proj (both experts) times ``OUTLIER_SCALE``, as in
``scripts/fp8_accuracy_report.py``: on the bf16 weights, and on the FP8 models' per-channel weight scales (the
quantized weight times 50, which is what quantizing the scaled weight gives up to one ulp of its scale).

    python -m benchmarks.bench_fp8_e2e [--preset bagel-7b-mot] [--size 1024] [--steps 50] [--modes none fp8 ...]
        [--img2img] [--outliers]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bagel_kernels import KernelOptions
from bagel_kernels.fp8_quant import FP8_DTYPE
from bagel_model.pipeline import BagelPipeline
from scripts.calibrate_cache import image_metrics, relative_error

from .common import add_output_args, emit, require_cuda, row

MODES = {"none": KernelOptions(),
         "fp8": KernelOptions(quantization="fp8"),
         "fp8-promoted": KernelOptions(quantization="fp8", fp8_accumulation="promoted"),
         "fp8-row": KernelOptions(quantization="fp8", fp8_activation_scaling="row"),
         "fp8-tensor": KernelOptions(quantization="fp8", fp8_activation_scaling="tensor")}
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_SCALE = 50.0
GIB = 2 ** 30


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_fp8_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="bagel-7b-mot")
    ap.add_argument("--size", type=int, default=1024, help="image side in pixels")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=["none", "fp8", "fp8-promoted"],
                    help="none is the peer every other mode is compared with (run it first)")
    ap.add_argument("--img2img", action="store_true", help="an image edit at --size instead of text to image")
    ap.add_argument("--outliers", action="store_true",
                    help=f"scale residual channels {OUTLIER_CHANNELS} x{OUTLIER_SCALE:g} (the accuracy gate's case b)")
    return add_output_args(ap)


@torch.no_grad()
def add_outlier_channels(model) -> None:
    """Residual-stream outliers: the hidden channels ``OUTLIER_CHANNELS`` written by every o_proj and down_proj
    (both experts) scaled by ``OUTLIER_SCALE``, in place (the packs view these rows), before the first forward."""
    rows = list(OUTLIER_CHANNELS)
    for layer in model.language_model.model.layers:
        for path in ("self_attn.o_proj", "self_attn.o_proj_moe_gen", "mlp.down_proj", "mlp_moe_gen.down_proj"):
            mod = layer.get_submodule(path)
            if mod.weight.dtype == FP8_DTYPE:
                mod.weight_scale[rows] *= OUTLIER_SCALE
            else:
                mod.weight.data[rows] *= OUTLIER_SCALE


def run_mode(a: argparse.Namespace, kernels: KernelOptions) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    pipe = BagelPipeline.from_preset(a.preset, device="cuda", kernels=kernels)
    if a.outliers:
        add_outlier_channels(pipe.model)
    built, build_peak = torch.cuda.memory_allocated() / GIB, torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    pipe.set_progress_bar_config(disable=True)
    if a.img2img:  # an edit of a fixed synthetic a.size² picture (the warm-up compiles the same layout)
        img = (np.arange(a.size * a.size * 3) % 251).astype(np.uint8).reshape(a.size, a.size, 3)
        call, prompt = dict(image=img), "make the cube blue"
    else:
        call, prompt = dict(height=a.size, width=a.size), "a photo of a red cube on a wooden table"
    pipe("warm up", num_inference_steps=3, **call)
    outs, secs = [], []
    for _ in range(2):  # a new prompt (its context length is a new step layout), then the same request again
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs.append(pipe(prompt, num_inference_steps=a.steps, output_type="np", **call))
        torch.cuda.synchronize()
        secs.append(time.perf_counter() - t0)
    if outs[1].latent_md5s != outs[0].latent_md5s:
        raise RuntimeError(f"the repeated request gave other bits: {outs[0].latent_md5s} then {outs[1].latent_md5s}")
    return {"out": outs[0], "secs": secs[0], "secs_again": secs[1], "built": built, "build_peak": build_peak,
            "peak": torch.cuda.max_memory_allocated() / GIB}


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    require_cuda("bench_fp8_e2e")
    shape = (f"{a.preset} {'img2img' if a.img2img else 'text2img'} {a.size}² {a.steps} steps, random weights"
             + (" + outliers" if a.outliers else ""))
    res: dict[str, dict] = {}
    rows = []
    for mode in a.modes:
        r = res[mode] = run_mode(a, MODES[mode])
        print(f"{mode}: {r['secs']:.3f} s/image ({r['secs_again']:.3f} s the same request again), "
              f"{r['built']:.2f} GiB after build (peak {r['build_peak']:.2f}), "
              f"generation peak {r['peak']:.2f} GiB, latent md5 {r['out'].latent_md5s[0]}", flush=True)
        name = "bf16 exact" if mode == "none" else mode
        peer = res.get("none")
        rows.append(row(f"{name} end to end", shape, "s/image", r["secs"], "bf16 exact" if peer else "",
                        peer["secs"] if peer and mode != "none" else None))
        rows.append(row(f"{name} end to end, the same request again (its step layouts captured)", shape, "s/image",
                        r["secs_again"], "bf16 exact" if peer else "",
                        peer["secs_again"] if peer and mode != "none" else None))
        rows.append(row(f"{name} peak memory (generation)", shape, "GiB", r["peak"]))
        rows.append(row(f"{name} memory after build (build peak {r['build_peak']:.2f})", shape, "GiB", r["built"]))
        if peer and mode != "none":
            img = lambda o: np.round(o.images[0] * 255).astype(np.uint8)  # noqa: E731
            err = relative_error(r["out"].latents[0], peer["out"].latents[0])
            psnr, ssim = image_metrics(img(peer["out"]), img(r["out"]))
            print(f"{mode} vs bf16: latent rel err {err:.4g}, PSNR {psnr:.2f} dB, SSIM {ssim:.4f}", flush=True)
            rows.append(row(f"{name} final-latent error vs bf16", shape, "rel err", err))
            rows.append(row(f"{name} decoded PSNR vs bf16", shape, "dB", psnr))
    emit(rows, a)


if __name__ == "__main__":
    main()
