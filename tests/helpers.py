"""Small builders the tests share: text-to-image contexts and requests made as the pipeline makes them (stage 0's
paged prefill), and the per-branch oracle's result for a request."""
from __future__ import annotations

import torch

from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.denoise import DenoiseRequest, denoise
from bagel_model.oracle import PerBranchStep
from bagel_model.serving.stages import Request, prepare_image


def t2i_contexts(model, tok, prompt: str) -> dict:
    """The three CFG contexts of a text-to-image prompt ("img" is the "full" object)."""
    return prepare_image(model, tok, Request("text2img", prompt, SamplingParams())).contexts


def t2i_request(model, tok, prompt: str, params: SamplingParams) -> DenoiseRequest:
    """A text-to-image request at its first step: contexts prefilled, seeded noise drawn."""
    return prepare_image(model, tok, Request("text2img", prompt, params)).start(model)


def per_branch(model, tok, prompt: str, params: SamplingParams) -> torch.Tensor:
    """The oracle's final latent: one forward per CFG branch, as the model was first written."""
    return denoise([t2i_request(model, tok, prompt, params)], PerBranchStep(model), progress=False)[0]


def gemm_operands(m: int, n: int, k: int, parts: int, bias: bool, residual: bool, seed: int, device: str = "cuda"):
    """Random bf16 operands of a two-expert routed GEMM: x (m, k), weight (2, parts, n, k) scaled by k^-1/2 (outputs
    of order one), bias (2, parts, n) and residual (m, n), or None where not asked for."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=torch.bfloat16, generator=g)

    x, w = randn(m, k), randn(2, parts, n, k) * k ** -0.5
    return x, w, randn(2, parts, n) if bias else None, randn(m, n) if residual else None
