"""A/B of the attention kernel inside the full BAGEL-7B-MoT denoise step (1024², 3 CFG branches, random bf16):
the Gluon kernel (default on Hopper) vs the Triton kernel (``BAGEL_ATTN_GLUON=0``), in one process, and how many
attention calls took the Gluon path. Run on the GPU: ``python benchmarks/attention_in_model.py``."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bagel_kernels.attention_gluon as ag  # noqa: E402
from gpu_session import full_size_step  # noqa: E402

calls = {"gluon": 0}
_real = ag.attention_gluon


def _counting(*a, **kw):
    calls["gluon"] += 1
    return _real(*a, **kw)


ag.attention_gluon = _counting
out = {}
for flag in ("1", "0", "1"):
    os.environ["BAGEL_ATTN_GLUON"] = flag
    calls["gluon"] = 0
    res = full_size_step()
    out.setdefault(f"gluon={flag}", []).append({"step_3branch_ms": res["step_3branch_ms"], "gluon_calls": calls["gluon"],
                                                "sync": res["sync_debug_error_mode"]})
print(json.dumps(out))
