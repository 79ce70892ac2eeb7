"""Question: where does the routed GEMM lose to dense cuBLAS at prefill sizes? Finding (H100, 2026-11-23, the Triton kernel before Gluon): QKV shape ours / dense 0.83–0.88 at M = 4198 and 0.56–0.60 at M = 1024 with uniform routing; mixed routing 0.62, 0.68 after the dynamic tile queue (a straddling tile runs two K loops).

    python -m probes.gemm_m_probe      (on a GPU; prints one line per (M, routing))
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import bagel_kernels as bk


def main() -> None:
    n, k = 4608, 3584
    w = torch.randn(2, 1, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    for m, kind in [(4198, "gen"), (4198, "mixed"), (4224, "gen"), (8192, "gen"), (12294, "gen"), (12294, "mixed"),
                    (2048, "gen"), (1024, "gen")]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        r = (bk.ExpertSegments.uniform(m, True) if kind == "gen"
             else bk.ExpertSegments.from_flags([False] * 40 + [True] * (m - 100) + [False] * 60))
        ids = r.expert_ids("cuda")
        ours = do_bench_cudagraph(lambda: bk.routed_linear(x, r, w, expert_ids=ids))
        dense = do_bench_cudagraph(lambda: F.linear(x, w[1, 0]))
        tf = lambda ms: round(2 * m * n * k / ms / 1e9, 1)
        print({"M": m, "routing": kind, "ours": tf(ours), "dense": tf(dense), "ratio": round(dense / ours, 3)}, flush=True)


if __name__ == "__main__":
    main()
