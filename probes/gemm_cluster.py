"""Question: can a CUDA routed GEMM with 2-CTA clusters + TMA multicast beat cuBLAS exactly? Finding: same bits, slower.

Issue #32: does a Hopper routed GEMM with 2-CTA clusters and TMA multicast of the weight tile
(``probes/gemm_cluster_sm90.cu``) beat dense bf16 cuBLAS at the step's shapes, and does it give the shipped exact
Gluon kernel's bits (same tiles, same wgmma sequence in K order, same epilogue roundings)? Finding (one H100,
2026-12-08): its bits equal the Gluon kernel's on every projection and row set (qkv + bias, o_proj and down +
residual, gate/up SwiGLU; the 1024² and 512² steps, an SP/2 share, the img2img prefill's three segments), so a
CUDA kernel can take over the exact mode without moving an md5; but this kernel runs 0.67-0.74x the Gluon kernel,
and so does its schedule without clusters (0.63-0.70x): the CUDA mainloop itself was slow, while clusters with
multicast added 7-13 % over it on o_proj, gate_up and down (``--variants``; benchmarks/RESULTS.md). The SASS then
showed why: the stage release (``mbarrier.arrive.release.cluster``) compiled to MEMBAR.ALL.GPU before every K step's
arrive, and the A descriptors went through R2UR (the warpgroup index was not warp-uniform to the compiler). Both are
fixed in the .cu (default-semantics arrive, as CUTLASS's; ``__shfl_sync`` for the warpgroup index: its mainloop's
SASS is now the Gluon kernel's shape) and NOT yet measured: the "release.cluster arrive" variants rebuild the
measured version for comparison. The "ping-pong" variants (``BK_PINGPONG``, written 2026-12-08, built for sm_90a and
read in SASS on the CPU, never run) give each consumer warpgroup whole 128 x 128 tiles (SwiGLU: 128 x 64 of gate and
of up) in turn, so one warpgroup's epilogue overlaps the other's main loop; their wgmma are n128 (n64) instead of
n256 (n128), and the bit check says whether that moves any element's bits. Since 2026-12-08 (session 12, not yet
measured) a consumer warpgroup whose 64 rows of a tile all lie past the tile's segment (the 4 marker rows' tile, a
segment's last rows) skips its wgmma; "no empty-half skip" builds the kernel without that.

Builds the CUDA file with nvcc (sm_90a) into a shared library, calls it through ctypes on torch's current stream,
and times it (CUDA-graph replay, ``benchmarks.common.bench_ms``) against the exact Gluon kernel (the shipped
schedule) and dense cuBLAS with the same epilogue (``benchmarks.peers.projection_peers``) on
``bench_routed_gemm --sweep``'s row sets and projections (qkv + bias, o_proj + residual, gate/up SwiGLU,
down + residual), printing one JSON row per case.

    python -m probes.gemm_cluster [--sets "t2i 1024² step 2×4098+4" ...] [--json OUT]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from bagel_kernels.routed_gemm_gluon import BLOCK_K, GROUP_M, _block_n, _segment_bounds, _stages, launch_routed_gemm_ws
from benchmarks.bench_routed_gemm import cases
from benchmarks.shapes import sweep_token_sets
from benchmarks.common import bench_ms
from benchmarks.peers import projection_peers

SRC = os.path.join(os.path.dirname(__file__), "gemm_cluster_sm90.cu")
DEFAULT_SETS = ["t2i 1024² step 2×4098+4", "t2i 512² step 2×1026+4", "i2i prefill mixed",
                "SP/2 share of 1024² step"]


VARIANTS = {"shipped schedule": [], "wait each step": ["-DBK_WAIT0=1"], "no multicast": ["-DBK_MULTICAST=0"],
            "wait each step, no multicast": ["-DBK_WAIT0=1", "-DBK_MULTICAST=0"],
            "no clusters (Gluon's schedule in CUDA)": ["-DBK_CLUSTER=1"],
            "no clusters, wait each step": ["-DBK_CLUSTER=1", "-DBK_WAIT0=1"],
            "release.cluster arrive (as measured 2026-12-08)": ["-DBK_RELEASE_CLUSTER=1"],
            "stores from registers, 4 stages": ["-DBK_DIRECT=1"],
            "no clusters, release.cluster arrive": ["-DBK_CLUSTER=1", "-DBK_RELEASE_CLUSTER=1"],
            "no empty-half skip": ["-DBK_SKIP_HALF=0"],
            "ping-pong consumers": ["-DBK_PINGPONG=1"],
            "ping-pong, no multicast": ["-DBK_PINGPONG=1", "-DBK_MULTICAST=0"],
            "ping-pong, no clusters": ["-DBK_PINGPONG=1", "-DBK_CLUSTER=1"]}


def build(flags: list[str] = ()) -> ctypes.CDLL:
    out = os.path.join(tempfile.mkdtemp(), "libgemm_cluster.so")
    subprocess.run(["nvcc", "-O3", "-std=c++17", "-fmad=false", "-gencode", "arch=compute_90a,code=sm_90a",
                    "-shared", "-Xcompiler", "-fPIC", *flags, "-o", out, SRC], check=True)
    lib = ctypes.CDLL(out)
    lib.bk_routed_gemm_cluster.restype = ctypes.c_int
    lib.bk_routed_gemm_cluster.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 12 + [ctypes.c_void_p]
    lib.bk_gemm_cluster_max_clusters.restype = ctypes.c_int
    return lib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=DEFAULT_SETS)
    ap.add_argument("--variants", nargs="+", default=["shipped schedule"], choices=list(VARIANTS))
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    with ThreadPoolExecutor(max_workers=len(a.variants)) as pool:  # nvcc runs as its own process: build in parallel
        libs = dict(zip(a.variants, pool.map(lambda v: build(VARIANTS[v]), a.variants)))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    clusters = {v: lib.bk_gemm_cluster_max_clusters() or (sms if "no clusters" in v else sms // 2)
                for v, lib in libs.items()}
    print(f"{torch.cuda.get_device_name()}: clusters resident {clusters}", flush=True)
    sets = {k: v for k, v in sweep_token_sets().items() if k in a.sets}
    rows = []
    for routing, ids, (pname, n, k, swiglu), (p, w, x, bias, res, tf), shape in cases(sets):
        m = routing.num_tokens
        bounds = _segment_bounds(routing.segments, m)
        if bounds is None:
            print(f"skip {shape}: more than four segments")
            continue
        b1, b2, b3, e0 = bounds
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        ref = torch.empty_like(out)

        def ours(lib: ctypes.CDLL, c: int) -> None:
            r = lib.bk_routed_gemm_cluster(x.data_ptr(), w.data_ptr(), out.data_ptr(),
                                           bias.data_ptr() if bias is not None else None,
                                           res.data_ptr() if res is not None else None,
                                           m, n, k, w.shape[0], p, b1, b2, b3, e0, n, n, c,
                                           torch.cuda.current_stream().cuda_stream)
            if r:
                raise RuntimeError(f"bk_routed_gemm_cluster returned {r}")

        def exact() -> torch.Tensor:
            return launch_routed_gemm_ws(x, w, ref, bias, ids, swiglu, res, routing.segments, None,
                                         _block_n(swiglu), BLOCK_K, _stages(swiglu), group_m=GROUP_M)

        exact()
        t_exact = bench_ms(exact)
        t_dense = bench_ms(projection_peers(x, ids.bool(), w, swiglu, True, bias, res)["dense cuBLAS"])
        row = {"shape": shape, "exact_gluon_tflops": round(tf(t_exact), 1),
               "dense_cublas_tflops": round(tf(t_dense), 1), "exact/dense": round(t_dense / t_exact, 3)}
        for vname, lib in libs.items():
            out.zero_()
            ours(lib, clusters[vname])
            torch.cuda.synchronize()
            t_ours = bench_ms(lambda lib=lib, c=clusters[vname]: ours(lib, c))
            row[vname] = {"tflops": round(tf(t_ours), 1), "/dense": round(t_dense / t_ours, 3),
                          "/exact": round(t_exact / t_ours, 3), "bits_equal_exact": bool(torch.equal(out, ref)),
                          "max_abs_diff_vs_exact": (out.float() - ref.float()).abs().max().item()}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
    if a.json:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "clusters": clusters,
                   "rows": rows}, open(a.json, "w"), indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
