"""Where does the routed GEMM lose at prefill sizes? Ours vs dense cuBLAS for the QKV shape over M and routing
(CUDA-graph timing, no launch overhead). Exploration script; results in RESULTS.md."""
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

import bagel_kernels as bk

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
