"""BAGEL-7B-MoT dimensions and token sets the GEMM and layer benchmarks share (docs/DESIGN.md §1, §2): hidden 3584,
q 28×128, kv 4×128, MLP 18944; the generation step (3 CFG branches × 4098 generation tokens) and the img2img AR prefill with
mixed routing (40 text + 4098 image + 60 text)."""
from __future__ import annotations

import bagel_kernels as bk

H, HQ, HKV, D, INTER = 3584, 28, 4, 128, 18944
NQKV = (HQ + 2 * HKV) * D
PROJECTIONS = [  # name, N, K, swiglu
    ("qkv", NQKV, H, False),
    ("o_proj", H, HQ * D, False),
    ("gate_up", INTER, H, True),
    ("down", H, INTER, False),
]
# What each projection's epilogue adds in the model (bagel_model.core.layers): qkv its bias, o_proj and down the residual
# stream; gate_up its SwiGLU (the swiglu flag above).
EPILOGUE = {"qkv": "bias", "o_proj": "residual", "gate_up": None, "down": "residual"}


def token_sets() -> dict[str, bk.ExpertSegments]:
    flags = [False] * 40 + [True] * 4098 + [False] * 60
    return {"gen step 3×4098": bk.ExpertSegments.uniform(3 * 4098, True),
            "i2i prefill mixed": bk.ExpertSegments.from_flags(flags)}
