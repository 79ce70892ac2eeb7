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


def sweep_token_sets() -> dict[str, bk.ExpertSegments]:
    """The row sets of issue #32's targets: generation steps (latents on the generation expert, 4 marker rows on
    the understanding expert), img2img, its prefill, and an SP rank's share of the 1024² step."""
    def step(m_gen: int) -> bk.ExpertSegments:
        return bk.ExpertSegments(((0, m_gen, True), (m_gen, m_gen + 4, False)))
    sets = {"t2i 1024² step 2×4098+4": step(2 * 4098), "t2i 512² step 2×1026+4": step(2 * 1026),
            "i2i step 3×4098": bk.ExpertSegments.uniform(3 * 4098, True),
            "SP/2 share of 1024² step": step(4098), "SP/4 share of 1024² step": step(2049)}
    sets["i2i prefill mixed"] = token_sets()["i2i prefill mixed"]
    return sets
