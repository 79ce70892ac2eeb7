"""Question: with the CUDA cluster GEMM in the model, how fast are the step and an image, same bits? Finding: not yet run.

Issue #32 asks for the exact routed GEMM faster than cuBLAS *and* for what a user feels: exact 1024² text to image
≤ 8.3 s through the pipeline, the packed step ≥ 1.10× the torch.compile'd plain step. ``probes.gemm_cluster``
answers the first per projection; this answers the second before any ``csrc/`` integration is written. It builds
one variant of ``probes/gemm_cluster_sm90.cu``, then runs ``benchmarks.bench_step`` (graph check, packed step,
end to end; no compile peer: its step time is in RESULTS.md) twice in this process on the same random
BAGEL-7B-MoT: once as shipped, once with the exact bf16 GEMM dispatch (``routed_linear``'s one call of
``routed_gemm_gluon``) sending every launch the CUDA kernel supports to it — at most four segments of at most two
experts, no residual with SwiGLU or with a bias, N a multiple of the tile — and the rest to the Gluon kernel. It
prints per case the two step times and end-to-end seconds, their ratio, whether the final latents' md5s are equal
(they must be: the probe's GEMM gives the Gluon kernel's bits) and how many launches each kernel took.

    python -m probes.gemm_cluster_e2e [--variant "shipped schedule"] [--size 1024] [--json OUT]
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import tempfile
from collections import Counter

import torch

from bagel_kernels.routed_gemm_gluon import _segment_bounds
from benchmarks import bench_step
from probes.gemm_cluster import VARIANTS, build

# the module, not the package's function of the same name (``bagel_kernels.routed_linear``)
routed_linear = importlib.import_module("bagel_kernels.routed_linear")
GLUON = routed_linear.routed_gemm_gluon
LAUNCHES: Counter = Counter()


def cluster_dispatch(lib, clusters: int):
    """A drop-in for ``routed_gemm_gluon`` that runs the CUDA kernel where it supports the launch."""
    def dispatch(x, weight, bias, expert_ids, swiglu=False, residual=None, out=None, segments=None,
                 split_tail=None):
        m, k = x.shape
        e, p, n, _ = weight.shape
        bounds = _segment_bounds(segments if segments is not None else (None if e > 1 else ((0, m, 0),)), m)
        block_n = 256 // p
        supported = (x.dtype == weight.dtype == torch.bfloat16 and e <= 2 and p in (1, 2) and bounds is not None
                     and m > 0 and n % block_n == 0 and k % 64 == 0
                     and not (residual is not None and (p == 2 or bias is not None)))
        if not supported:
            LAUNCHES["gluon (not supported by the CUDA kernel)"] += 1
            return GLUON(x, weight, bias, expert_ids, swiglu, residual, out, segments, split_tail)
        if out is None:
            out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        b1, b2, b3, e0 = bounds
        r = lib.bk_routed_gemm_cluster(x.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                       None if bias is None else bias.data_ptr(),
                                       None if residual is None else residual.data_ptr(),
                                       m, n, k, e, p, b1, b2, b3, e0, n, n, clusters,
                                       torch.cuda.current_stream().cuda_stream if x.is_cuda else None)
        if r:
            raise RuntimeError(f"bk_routed_gemm_cluster returned {r} (m {m}, n {n}, k {k}, e {e}, p {p})")
        LAUNCHES["cuda cluster kernel"] += 1
        return out
    return dispatch


def run(kernel: str, args: argparse.Namespace, out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, f"step_{kernel}.json")
    LAUNCHES.clear()
    bench_step.main(["--sizes", str(args.size), "--steps", str(args.steps), "--parts", "check,step,e2e",
                     "--no-peer", "--json", path])
    print(f"[{kernel}] launches: {dict(LAUNCHES)}", flush=True)
    with open(path) as f:
        return json.load(f)["rows"]


def key(r: dict) -> tuple:
    return (r["subject"], r.get("mode", r.get("what")), r.get("size"), r.get("phase"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", default="shipped schedule", choices=list(VARIANTS))
    ap.add_argument("--size", type=int, default=1024, help="text-to-image side of the step and end-to-end rows")
    ap.add_argument("--steps", type=int, default=50, help="timesteps per image end to end")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gemm_cluster_e2e needs a Hopper GPU")
    lib = build(VARIANTS[a.variant])
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clusters = lib.bk_gemm_cluster_max_clusters() or (sms if "no clusters" in a.variant else sms // 2)
    out_dir = tempfile.mkdtemp()
    shipped = run("gluon", a, out_dir)
    routed_linear.routed_gemm_gluon = cluster_dispatch(lib, clusters)
    try:
        cuda = run("cuda", a, out_dir)
    finally:
        routed_linear.routed_gemm_gluon = GLUON
    base = {key(r): r for r in shipped}
    table = []
    for r in cuda:
        g = base.get(key(r), {})
        if r["subject"] == "check":
            t = dict(case=r["what"], equal=r["equal"], same_md5s_as_gluon=r["md5s"] == g.get("md5s"))
        elif r["subject"] == "denoise_step":
            t = dict(case=f"step {r['mode']} {r['size']}²", gluon_ms=g.get("ms"), cuda_ms=r["ms"],
                     speedup=round(g["ms"] / r["ms"], 3) if g else None, cuda_gpu_busy=r["gpu_busy"])
        else:
            t = dict(case=f"e2e {r['mode']} {r['size']}² {r['steps']} steps ({r['phase']})",
                     gluon_s=g.get("seconds"), cuda_s=r["seconds"],
                     speedup=round(g["seconds"] / r["seconds"], 3) if g else None,
                     latent_md5_equal=r["latent_md5"] == g.get("latent_md5"), latent_md5=r["latent_md5"])
        table.append(t)
        print(json.dumps(t, ensure_ascii=False), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), variant=a.variant, clusters=clusters, rows=table,
                           shipped=shipped, cuda=cuda), f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
