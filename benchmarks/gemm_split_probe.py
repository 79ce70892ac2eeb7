"""Probe of the routed GEMM's split region on the device: one projection launched a few times so that a profiler
(``ncu --kernel-name regex:_routed_gemm_ws``) can compare the ragged last round run whole and split.

``python benchmarks/gemm_split_probe.py --proj o_proj --tokens prefill`` (settings such as BAGEL_GEMM_SPLIT_TAIL come
from the environment)."""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bagel_kernels.routed_linear_gluon import routed_gemm_gluon  # noqa: E402
from mot_shapes import PROJECTIONS, token_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--proj", default="o_proj", choices=[p[0] for p in PROJECTIONS])
    ap.add_argument("--tokens", default="prefill", choices=["prefill", "gen"])
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args()
    routing = [r for name, r in token_sets().items() if args.tokens in name][0]
    _, n, k, swiglu = [p for p in PROJECTIONS if p[0] == args.proj][0]
    m, p, dev, dt = routing.num_tokens, 2 if swiglu else 1, "cuda", torch.bfloat16
    x = torch.randn(m, k, device=dev, dtype=dt)
    w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
    res = torch.randn(m, n, device=dev, dtype=dt) if args.proj in ("o_proj", "down") else None
    ids = routing.expert_ids(dev)
    for _ in range(args.repeat):
        routed_gemm_gluon(x, w, None, ids, swiglu, res, segments=routing.segments)
    torch.cuda.synchronize()
    print("ok", args.proj, args.tokens, os.environ.get("BAGEL_GEMM_SPLIT_TAIL"))


if __name__ == "__main__":
    main()
