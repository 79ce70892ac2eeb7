"""Device check + timing of the warp-specialized Gluon routed GEMM against the Triton one and cuBLAS.

Run on a Hopper GPU: ``python benchmarks/gemm_gluon_check.py [--json OUT] [--skip-bench]``.
1. bits: the Gluon kernel's output equals the Triton kernel's bit for bit (plain, bias, SwiGLU, residual; one
   expert, uniform routing, mixed routing with tiles straddling the und/gen boundary; the last round whole and
   split; M = 1, 17, 300, 4198, 12294);
   error vs a float64 reference; row subsets of a mixed launch give the same rows (batch invariance).
2. speed (CUDA-graph replay): BAGEL-7B projections, gen step 3x4098 and mixed i2i prefill, Gluon / Triton / one dense
   cuBLAS GEMM of the same total size, and that GEMM with the same epilogue work (bias, residual, SwiGLU); fast mode's
   cuBLAS path (one GEMM per expert; per segment as before session 9).
``--variants`` also times the Gluon kernel under environment settings (exploration switches read at call time).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bagel_kernels.routed_linear_cublas import routed_linear_cublas  # noqa: E402
from bagel_kernels.routed_linear_gluon import routed_gemm_gluon  # noqa: E402
from bagel_kernels.routed_linear_triton import routed_gemm_triton  # noqa: E402
from mot_shapes import PROJECTIONS, token_sets, with_env  # noqa: E402


def reference(x, w, b, ids, swiglu, res):
    x64, w64 = x.double(), w.double()
    e = ids.long() if ids is not None else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    outs = []
    for j in range(w.shape[1]):
        y = torch.zeros(x.shape[0], w.shape[2], dtype=torch.float64, device=x.device)
        for ex in range(w.shape[0]):  # one GEMM per expert, each row keeps its own expert's result
            y_ex = x64 @ w64[ex, j].T + (b.double()[ex, j] if b is not None else 0.0)
            y = torch.where((e == ex)[:, None], y_ex, y)
        outs.append(y)
    y = torch.nn.functional.silu(outs[0]) * outs[1] if swiglu else outs[0]
    return y + res.double() if res is not None else y


def segments_of(ids):
    """Host-side (start, end, expert) runs of a routing (the check builds them from ids; the model has them)."""
    from bagel_kernels import ExpertSegments

    return None if ids is None else ExpertSegments.from_flags(ids.tolist()).segments


def check_bits() -> list[dict]:
    rows = []
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    cases = []
    for m in (1, 17, 300, 4198, 12294):  # 12294 = 97 row tiles: balanced tile groups of 8 and 7
        for n, k in ((512, 256), (4608, 3584)):
            for swiglu in (False, True):
                for routing in ("none", "uniform", "mixed"):
                    for extra in ("", "bias", "res"):
                        if extra == "res" and swiglu:
                            continue
                        cases.append((m, n, k, swiglu, routing, extra))
    for m, n, k, swiglu, routing, extra in cases:
        if n == 4608 and (m in (1, 17, 12294) or extra == "bias"):
            continue
        p = 2 if swiglu else 1
        e = 1 if routing == "none" else 2
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        w = (torch.randn(e, p, n, k, device=dev, dtype=dt, generator=g) * k ** -0.5).contiguous()
        b = torch.randn(e, p, n, device=dev, dtype=dt, generator=g) if extra == "bias" else None
        res = torch.randn(m, n, device=dev, dtype=dt, generator=g) if extra == "res" else None
        if routing == "none":
            ids = None
        elif routing == "uniform":
            ids = torch.ones(m, dtype=torch.int32, device=dev)
        else:  # und text, gen span, und text: boundaries inside 128-row tiles
            ids = torch.zeros(m, dtype=torch.int32, device=dev)
            ids[min(m, 40):max(min(m, 40), m - 60)] = 1
        segs = segments_of(ids)
        a = routed_gemm_gluon(x, w, b, ids, swiglu, res, segments=segs)  # row tiles at segment starts
        a_ids = routed_gemm_gluon(x, w, b, ids, swiglu, res)  # fixed row tiles, straddling ones run two K loops
        # the ragged last round split across programs (stream-K, continued K loops) wherever it is ragged
        a_split = with_env("BAGEL_GEMM_SPLIT_TAIL=1", lambda: routed_gemm_gluon(x, w, b, ids, swiglu, res,
                                                                                segments=segs))
        t = routed_gemm_triton(x, w, b, ids, swiglu, res)
        ref = reference(x, w, b, ids, swiglu, res)
        err = ((a.double() - ref).norm() / ref.norm()).item()
        row = {"M": m, "N": n, "K": k, "swiglu": swiglu, "routing": routing, "extra": extra,
               "gluon==triton": bool(torch.equal(a, t)) and bool(torch.equal(a_ids, t))
               and bool(torch.equal(a_split, t)),
               "max|gluon-triton|": (a.float() - t.float()).abs().max().item(),
               "rel_err": err, "nan": bool(torch.isnan(a).any())}
        if m == 4198 and routing == "mixed":
            sub_ok = True
            for s0, s1 in ((3, 517), (77, 78), (129, 131), (4100, 4198)):
                sub = routed_gemm_gluon(x[s0:s1].contiguous(), w, b, ids[s0:s1].contiguous(), swiglu,
                                        None if res is None else res[s0:s1].contiguous(),
                                        segments=segments_of(ids[s0:s1]))
                sub_ok &= bool(torch.equal(sub, a[s0:s1]))
            row["row_subsets_bitwise"] = sub_ok
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_rows(variants: list[str]) -> list[dict]:
    import torch.nn.functional as F
    from triton.testing import do_bench_cudagraph

    rows = []
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for tname, routing in token_sets().items():
        m = routing.num_tokens
        ids = routing.expert_ids(dev)
        for pname, n, k, swiglu in PROJECTIONS:
            p = 2 if swiglu else 1
            x = torch.randn(m, k, device=dev, dtype=dt)
            w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
            res = torch.randn(m, n, device=dev, dtype=dt) if pname in ("o_proj", "down") else None
            bias = torch.randn(2, p, n, device=dev, dtype=dt) if pname == "qkv" else None  # as in the model
            dense_w = w[1].reshape(p * n, k)
            flops = 2 * m * n * k * p
            segs = routing.segments
            dense_b = bias[1].reshape(p * n) if bias is not None else None
            impls = {
                "gluon": lambda: routed_gemm_gluon(x, w, bias, ids, swiglu, res, segments=segs),
                "gluon (ids only)": lambda: routed_gemm_gluon(x, w, bias, ids, swiglu, res),
                "triton": lambda: routed_gemm_triton(x, w, bias, ids, swiglu, res),
                "dense cuBLAS": lambda: F.linear(x, dense_w),
                # fast mode: one cuBLAS GEMM per expert, epilogue by cuBLAS (bias, residual as C) or eager (SwiGLU)
                "fast: cuBLAS per expert": lambda: routed_linear_cublas(x, routing, w, bias, swiglu, res),
                # before session 9: one cuBLAS GEMM per contiguous segment (each text run re-reads W_und)
                "fast: cuBLAS per segment": lambda: torch.cat([
                    routed_linear_cublas(x[s:t], None, w[int(g)][None], None if bias is None else bias[int(g)][None],
                                         swiglu, None if res is None else res[s:t]) for s, t, g in segs]),
            }
            if res is not None:  # the residual as a separate eager add instead of cuBLAS's C operand
                impls["fast: cuBLAS per expert, eager add"] = (
                    lambda: routed_linear_cublas(x, routing, w, bias, swiglu, None).add_(res))
            # The same epilogue work as ours: bias (qkv) fused by cuBLASLt, the residual as C with beta = 1
            # (o_proj, down; one rounding where the model's eager x + o_proj(a) has two), and for SwiGLU, which
            # cuBLAS cannot fuse, the GEMM followed by eager silu(gate) * up.
            if dense_b is not None:
                impls["dense cuBLAS, same epilogue"] = lambda: F.linear(x, dense_w, dense_b)
            elif res is not None:
                impls["dense cuBLAS, same epilogue"] = lambda: torch.addmm(res, x, dense_w.T)
            elif swiglu:
                def gemm_swiglu():
                    gate, up = F.linear(x, dense_w).chunk(2, dim=-1)
                    return F.silu(gate) * up
                impls["dense cuBLAS, same epilogue"] = gemm_swiglu
            row = {"tokens": tname, "proj": pname, "M": m, "N": n * p, "K": k, "residual": res is not None,
                   "bias": bias is not None}
            for name, fn in impls.items():
                ms = do_bench_cudagraph(fn, rep=200, return_mode="median")
                row[name] = round(flops / (ms * 1e-3) / 1e12, 1)
            for v in variants:
                ms = with_env(v, lambda: do_bench_cudagraph(impls["gluon"], rep=200, return_mode="median"))
                row[f"gluon[{v}]"] = round(flops / (ms * 1e-3) / 1e12, 1)
            row["gluon/dense"] = round(row["gluon"] / row["dense cuBLAS"], 3)
            if "dense cuBLAS, same epilogue" in row:
                row["gluon/dense same epilogue"] = round(row["gluon"] / row["dense cuBLAS, same epilogue"], 3)
            row["triton/dense"] = round(row["triton"] / row["dense cuBLAS"], 3)
            row["fast per expert/dense"] = round(row["fast: cuBLAS per expert"] / row["dense cuBLAS"], 3)
            rows.append(row)
            print(row, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write {'bits': [...], 'bench': [...]} here")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-bits", action="store_true")
    ap.add_argument("--variants", nargs="*", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="also time the Gluon kernel under these environment settings (e.g. BAGEL_GEMM_GROUPS=fixed)")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    out = {"device": torch.cuda.get_device_name()}
    if not args.skip_bits:
        out["bits"] = check_bits()
        bad = [r for r in out["bits"] if not r["gluon==triton"] or r["nan"] or not r.get("row_subsets_bitwise", True)]
        print(f"bits: {len(out['bits']) - len(bad)}/{len(out['bits'])} cases bitwise equal, NaN-free, invariant")
    if not args.skip_bench:
        out["bench"] = bench_rows(args.variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
