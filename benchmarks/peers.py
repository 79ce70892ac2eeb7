"""The peers every benchmark compares against, in one place: attention through PyTorch's SDPA backends (cuDNN,
FLASH, EFFICIENT; K/V expanded for GQA) and FlexAttention, and the MoT projection as one dense cuBLAS GEMM, as the
eager mask/scatter path (BAGEL's original code), and compiled."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bagel_kernels import apply_rope_reference, rms_norm_reference

SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION}


def attention_peers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                    flex: bool = True) -> dict[str, Callable[[], torch.Tensor]]:
    """Peer callables for q (Nq, Hq, D) over k/v (Nk, Hkv, D): each SDPA backend that accepts the call, and
    FlexAttention (compiled, GQA native; unmasked calls only)."""
    hq, hkv = q.shape[1], k.shape[1]
    qh = q.transpose(0, 1)[None]
    kh = k.repeat_interleave(hq // hkv, 1).transpose(0, 1)[None].contiguous()
    vh = v.repeat_interleave(hq // hkv, 1).transpose(0, 1)[None].contiguous()
    out = {}
    for name, be in SDPA_BACKENDS.items():
        def f(be=be):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
        try:
            f()
            out[name] = f
        except RuntimeError:  # this backend does not take the call (e.g. a dense mask on FLASH)
            pass
    if flex and mask is None:
        try:
            from torch.nn.attention.flex_attention import flex_attention  # optional: compiles with Inductor

            compiled = torch.compile(flex_attention)
            kg, vg = k.transpose(0, 1)[None].contiguous(), v.transpose(0, 1)[None].contiguous()

            def g():
                return compiled(qh, kg, vg, enable_gqa=True)
            g()
            out["flex"] = g
        except Exception as e:  # noqa: BLE001 - a peer that does not build is reported, not fatal
            print("flex unavailable:", type(e).__name__, e)
    return out


def mask_scatter_linear(x: torch.Tensor, gen_mask: torch.Tensor, w_und: torch.Tensor, w_gen: torch.Tensor,
                        b_und: torch.Tensor | None = None, b_gen: torch.Tensor | None = None) -> torch.Tensor:
    """The eager MoT projection: gather each expert's rows by boolean mask, two GEMMs, scatter back (host syncs)."""
    out = x.new_empty(x.shape[0], w_und.shape[0])
    und = ~gen_mask
    if und.any():
        out[und] = F.linear(x[und], w_und, b_und)
    if gen_mask.any():
        out[gen_mask] = F.linear(x[gen_mask], w_gen, b_gen)
    return out


def projection_peers(x: torch.Tensor, gen_mask: torch.Tensor, w: torch.Tensor, swiglu: bool, graph: bool,
                     bias: torch.Tensor | None = None, residual: torch.Tensor | None = None
                     ) -> dict[str, Callable[[], torch.Tensor]]:
    """Peers of the routed projection of x with stacked weights w (2, P, N, K) and the model's epilogue (``bias``
    (2, P, N) or ``residual`` (M, N)): "dense cuBLAS" (ONE GEMM over all rows with the generation weight, its bias
    or residual in cuBLAS's epilogue: what routing would cost if it cost nothing), and unless timed by graph replay
    (they synchronize) "mask/scatter" and its ``torch.compile``."""
    e, p, n, k = w.shape
    dense_w = w[1].reshape(p * n, k)
    b_und, b_gen = (None, None) if bias is None else (bias[0].reshape(p * n), bias[1].reshape(p * n))
    if residual is not None:
        def dense():
            return torch.addmm(residual, x, dense_w.t())  # beta = 1: the residual in the GEMM's epilogue
    else:
        def dense():
            return F.linear(x, dense_w, b_gen)
    peers: dict[str, Callable[[], torch.Tensor]] = {"dense cuBLAS": dense}
    if swiglu:
        def ref():
            gu = mask_scatter_linear(x, gen_mask, w[0].reshape(p * n, k), w[1].reshape(p * n, k), b_und, b_gen)
            return F.silu(gu[:, :n]) * gu[:, n:]
    else:
        def ref():
            y = mask_scatter_linear(x, gen_mask, w[0, 0], w[1, 0], b_und, b_gen)
            return y if residual is None else residual + y
    if not graph:
        peers["mask/scatter"] = ref
        try:
            comp = torch.compile(ref)
            comp()
            peers["compiled mask/scatter"] = comp
        except Exception as e:  # noqa: BLE001 - a peer that does not compile is reported, not fatal
            print("compile failed:", type(e).__name__, str(e)[:200])
    return peers


def mask_scatter_layer(layer, x: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       ctx_k: torch.Tensor, ctx_v: torch.Tensor) -> torch.Tensor:
    """One MoT layer (``bagel_model.core.layers.MoTDecoderLayer``'s weights) the eager way, BAGEL's original code path:
    boolean-mask gathers/scatters per expert for every norm and projection, separate q/k/v and gate/up GEMMs, cuDNN
    SDPA over expanded K/V."""
    a, eps, und = layer.self_attn, layer.eps, ~mask
    hq, hkv, d = a.num_heads, a.num_kv_heads, a.head_dim

    def routed_norm(t, m_und, m_gen):
        out = torch.empty_like(t)
        out[und] = rms_norm_reference(t[und], m_und.weight, eps)
        out[mask] = rms_norm_reference(t[mask], m_gen.weight, eps)
        return out

    def proj(t, name):
        lu, lg = getattr(a, name), getattr(a, name + "_moe_gen")
        return mask_scatter_linear(t, mask, lu.weight, lg.weight, lu.bias, lg.bias)

    h = routed_norm(x, layer.input_layernorm, layer.input_layernorm_moe_gen)
    q = proj(h, "q_proj").view(-1, hq, d)
    k = proj(h, "k_proj").view(-1, hkv, d)
    v = proj(h, "v_proj").view(-1, hkv, d)
    qn, kn = torch.empty_like(q, dtype=torch.float32), torch.empty_like(k, dtype=torch.float32)
    qn[und] = rms_norm_reference(q[und].float(), a.q_norm.weight, eps)
    qn[mask] = rms_norm_reference(q[mask].float(), a.q_norm_moe_gen.weight, eps)
    kn[und] = rms_norm_reference(k[und].float(), a.k_norm.weight, eps)
    kn[mask] = rms_norm_reference(k[mask].float(), a.k_norm_moe_gen.weight, eps)
    q = apply_rope_reference(qn, cos, sin).to(x.dtype)
    k = apply_rope_reference(kn, cos, sin).to(x.dtype)
    kk = torch.cat([ctx_k, k]).repeat_interleave(hq // hkv, 1).transpose(0, 1)[None]
    vv = torch.cat([ctx_v, v]).repeat_interleave(hq // hkv, 1).transpose(0, 1)[None]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv)[0].transpose(0, 1).reshape(-1, hq * d)
    x = x + mask_scatter_linear(o, mask, a.o_proj.weight, a.o_proj_moe_gen.weight)
    h = routed_norm(x, layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen)
    out = torch.empty_like(x)
    for m_rows, mlp in ((und, layer.mlp), (mask, layer.mlp_moe_gen)):
        t = h[m_rows]
        out[m_rows] = F.linear(F.silu(F.linear(t, mlp.gate_proj.weight)) * F.linear(t, mlp.up_proj.weight),
                               mlp.down_proj.weight)
    return x + out
