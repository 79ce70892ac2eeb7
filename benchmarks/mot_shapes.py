"""BAGEL-7B-MoT projections and one whole MoT layer: our routed Triton kernels vs cuBLAS-based peers.

Run on the GPU: ``python benchmarks/mot_shapes.py [--json OUT] [--configs]``. Shapes (DESIGN.md): hidden 3584, q 28×128,
kv 4×128, MLP 18944. Token sets: the generation step (3 CFG branches × 4098 generation tokens, all generation expert)
and the img2img AR prefill with mixed routing (text + 4096 VAE tokens + markers + text).
Peers in the same run:
- dense: ONE cuBLAS GEMM over all tokens with one weight (the limit: routing should cost nothing);
- mask/scatter: boolean masks, ``x[mask]`` gathers, two cuBLAS GEMMs, scatter back (the seeds' eager approach);
- compiled: ``torch.compile`` of the mask/scatter reference (where it compiles);
- fast: our "fast" mode, one cuBLAS GEMM per expert where cuBLAS wins (no masks, no sync, not batch-invariant;
  on Hopper SwiGLU and o_proj's residual stay on our fused kernel).
TFLOP/s = 2·M·N·K (× 2 parts for SwiGLU gate/up) / median time.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

H, HQ, HKV, D, INTER = 3584, 28, 4, 128, 18944
NQKV = (HQ + 2 * HKV) * D
PROJECTIONS = [  # name, N, K, swiglu
    ("qkv", NQKV, H, False),
    ("o_proj", H, HQ * D, False),
    ("gate_up", INTER, H, True),
    ("down", H, INTER, False),
]


def with_env(settings: str, fn):
    """``fn`` run with the comma-separated ``NAME=VALUE`` settings in the environment (the kernels read their mode
    and exploration switches at call time), the environment restored after."""
    pairs = [kv.split("=", 1) for kv in settings.split(",") if kv]
    saved = {k: os.environ.get(k) for k, _ in pairs}
    os.environ.update(dict(pairs))
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def token_sets():
    import bagel_kernels as bk

    gen = bk.ExpertSegments.uniform(3 * 4098, True)
    # img2img prefill: 40 text, ViT+VAE image (markers + 4096 latents), 60 text
    flags = [False] * 40 + [True] * 4098 + [False] * 60
    return {"gen step 3×4098": gen, "i2i prefill mixed": bk.ExpertSegments.from_flags(flags)}


def bench(fn) -> float:
    """Median ms. ``BAGEL_BENCH_CUDAGRAPH=1`` replays a CUDA graph: GPU time without Python launch overhead."""
    from triton.testing import do_bench, do_bench_cudagraph

    if os.environ.get("BAGEL_BENCH_CUDAGRAPH") == "1":
        return do_bench_cudagraph(fn, rep=200, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def mask_scatter_linear(x, gen_mask, w_und, w_gen, b_und=None, b_gen=None):
    """The eager MoT projection: gather each expert's rows by boolean mask, two GEMMs, scatter back."""
    out = x.new_empty(x.shape[0], w_und.shape[0])
    und = ~gen_mask
    if und.any():  # the host syncs the seeds removed
        out[und] = F.linear(x[und], w_und, b_und)
    if gen_mask.any():
        out[gen_mask] = F.linear(x[gen_mask], w_gen, b_gen)
    return out


def projection_rows(json_rows: list | None = None) -> list[dict]:
    import bagel_kernels as bk

    rows = []
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    for tname, routing in token_sets().items():
        m = routing.num_tokens
        x = torch.randn(m, H, device=dev, dtype=dt)
        xi = torch.randn(m, INTER, device=dev, dtype=dt)
        ids = routing.expert_ids(dev)
        mask = ids.bool()
        for pname, n, k, swiglu in PROJECTIONS:
            p = 2 if swiglu else 1
            w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
            inp = xi if k == INTER else (x if k == H else torch.randn(m, k, device=dev, dtype=dt))
            act = "swiglu" if swiglu else None
            flops = 2 * m * n * k * p
            dense_w = w[1].reshape(p * n, k)
            impls = {
                "ours": lambda: bk.routed_linear(inp, routing, w, activation=act, expert_ids=ids),
                "dense cuBLAS": lambda: F.linear(inp, dense_w),
                "fast (cuBLAS/expert)": lambda: bk.routed_linear(inp, routing, w, activation=act, mode="fast"),
            }
            if swiglu:
                def ms_ref():
                    gu = mask_scatter_linear(inp, mask, w[0].reshape(p * n, k), w[1].reshape(p * n, k))
                    return F.silu(gu[:, :n]) * gu[:, n:]
            else:
                def ms_ref():
                    return mask_scatter_linear(inp, mask, w[0, 0], w[1, 0])
            graphs = os.environ.get("BAGEL_BENCH_CUDAGRAPH") == "1"
            if not graphs:  # the mask/scatter peers synchronize (x[mask]) and cannot be captured in a graph
                impls["mask/scatter"] = ms_ref
            try:
                if graphs:
                    raise RuntimeError("not capturable")
                comp = torch.compile(ms_ref)
                comp()
                impls["compiled mask/scatter"] = comp
            except Exception as e:  # noqa: BLE001 - a peer that does not compile is reported, not fatal
                print("compile failed:", pname, type(e).__name__, str(e)[:200])
            row = {"tokens": tname, "proj": pname, "M": m, "N": n * p, "K": k}
            for name, fn in impls.items():
                try:
                    ms = bench(fn)
                except Exception as e:  # noqa: BLE001 - e.g. a peer that cannot be graph-captured
                    row[name] = f"n/a ({type(e).__name__})"
                    continue
                row[name] = round(flops / (ms * 1e-3) / 1e12, 1)
            row["ours/dense"] = round(row["ours"] / row["dense cuBLAS"], 3)
            print(row, flush=True)
            rows.append(row)
    if json_rows is not None:
        json_rows.extend(rows)
    return rows


def config_sweep(candidates: list[str]) -> list[dict]:
    """Exploration only: time ours under ``BAGEL_GEMM_CONFIG`` overrides (the shipped config stays fixed)."""
    import bagel_kernels as bk

    rows = []
    dev, dt = "cuda", torch.bfloat16
    routing = token_sets()["gen step 3×4098"]
    m = routing.num_tokens
    for pname, n, k, swiglu in PROJECTIONS:
        p = 2 if swiglu else 1
        w = torch.randn(2, p, n, k, device=dev, dtype=dt) * 0.02
        x = torch.randn(m, k, device=dev, dtype=dt)
        ids = routing.expert_ids(dev)
        for c in candidates:
            os.environ["BAGEL_GEMM_CONFIG"] = c
            try:
                ms = bench(lambda: bk.routed_linear(x, routing, w, activation="swiglu" if swiglu else None,
                                                    expert_ids=ids))
                rows.append({"proj": pname, "config": c, "TFLOP/s": round(2 * m * n * k * p / ms / 1e9, 1)})
            except Exception as e:  # noqa: BLE001
                rows.append({"proj": pname, "config": c, "error": f"{type(e).__name__}: {str(e)[:120]}"})
            print(rows[-1], flush=True)
        os.environ.pop("BAGEL_GEMM_CONFIG", None)
    return rows


def _ref_rms(x, w, eps):
    from bagel_kernels import rms_norm_reference
    return rms_norm_reference(x, w, eps)


def mask_scatter_layer(layer, x, mask, cos, sin, ctx_k, ctx_v):
    """One MoT layer the eager way (BAGEL's original code path): boolean-mask gathers/scatters per expert for every
    norm and projection, separate q/k/v and gate/up GEMMs, SDPA (cuDNN) over expanded K/V."""
    from bagel_kernels import apply_rope_reference
    from torch.nn.attention import SDPBackend, sdpa_kernel

    a, eps, und = layer.self_attn, layer.eps, ~mask

    def routed_norm(t, m_und, m_gen):
        out = torch.empty_like(t)
        out[und] = _ref_rms(t[und], m_und.weight, eps)
        out[mask] = _ref_rms(t[mask], m_gen.weight, eps)
        return out

    def proj(t, name):
        lu, lg = getattr(a, name), getattr(a, name + "_moe_gen")
        return mask_scatter_linear(t, mask, lu.weight, lg.weight, lu.bias, lg.bias)

    h = routed_norm(x, layer.input_layernorm, layer.input_layernorm_moe_gen)
    q = proj(h, "q_proj").view(-1, HQ, D)
    k = proj(h, "k_proj").view(-1, HKV, D)
    v = proj(h, "v_proj").view(-1, HKV, D)
    qn, kn = torch.empty_like(q, dtype=torch.float32), torch.empty_like(k, dtype=torch.float32)
    qn[und], qn[mask] = _ref_rms(q[und].float(), a.q_norm.weight, eps), _ref_rms(q[mask].float(), a.q_norm_moe_gen.weight, eps)
    kn[und], kn[mask] = _ref_rms(k[und].float(), a.k_norm.weight, eps), _ref_rms(k[mask].float(), a.k_norm_moe_gen.weight, eps)
    q = apply_rope_reference(qn, cos, sin).to(x.dtype)
    k = apply_rope_reference(kn, cos, sin).to(x.dtype)
    kk = torch.cat([ctx_k, k]).repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]
    vv = torch.cat([ctx_v, v]).repeat_interleave(HQ // HKV, 1).transpose(0, 1)[None]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk, vv)[0].transpose(0, 1).reshape(-1, HQ * D)
    x = x + mask_scatter_linear(o, mask, a.o_proj.weight, a.o_proj_moe_gen.weight)
    h = routed_norm(x, layer.post_attention_layernorm, layer.post_attention_layernorm_moe_gen)
    out = torch.empty_like(x)
    for m_rows, mlp in ((und, layer.mlp), (mask, layer.mlp_moe_gen)):
        t = h[m_rows]
        out[m_rows] = F.linear(F.silu(F.linear(t, mlp.gate_proj.weight)) * F.linear(t, mlp.up_proj.weight),
                               mlp.down_proj.weight)
    return x + out


def layer_rows() -> list[dict]:
    """A whole MoT layer at full size: ours (routed Triton kernels + Triton attention) vs the mask/scatter layer."""
    import bagel_kernels as bk
    from bagel_model.config import BagelConfig
    from bagel_model.layers import LayerInputs, MoTDecoderLayer, local_attention

    cfg = BagelConfig.preset("bagel-7b-mot")
    with torch.device("meta"):
        layer = MoTDecoderLayer(cfg, 0)
    layer = layer.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=g)
    rows = []
    cases = {"gen step, 4098 gen tokens, ctx 128": bk.ExpertSegments.uniform(4098, True),
             "i2i prefill, 40 text + 4098 image + 60 text": token_sets()["i2i prefill mixed"]}
    for cname, routing in cases.items():
        m, nctx = routing.num_tokens, 128
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        ck = torch.randn(nctx, HKV, D, device="cuda", dtype=torch.bfloat16)
        cv = torch.randn(nctx, HKV, D, device="cuda", dtype=torch.bfloat16)
        cos, sin = bk.rope_cos_sin(torch.arange(m, device="cuda") + nctx, D, 1e6)
        mask = routing.expert_ids("cuda").bool()
        attn = local_attention([bk.ContiguousKV(ck, cv)], m)

        def ours():
            li = LayerInputs(routing=routing, cos=cos, sin=sin, gen_mode=True)
            return layer(x, li, attn)

        def ref():
            return mask_scatter_layer(layer, x, mask, cos, sin, ck, cv)

        def ours_fast():
            return with_env("BAGEL_KERNELS_MODE=fast", ours)

        with torch.no_grad():
            a, b = ours(), ref()
            err = ((a.float() - b.float()).norm() / b.float().norm()).item()
            row = {"case": cname, "ours_ms": round(bench(ours), 3), "ours_fast_mode_ms": round(bench(ours_fast), 3),
                   "mask_scatter_ms": round(bench(ref), 3), "rel_err_vs_mask_scatter": err}
        row["speedup"] = round(row["mask_scatter_ms"] / row["ours_ms"], 3)
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the rows to this file")
    ap.add_argument("--configs", nargs="*", default=None,
                    help="also time these BAGEL_GEMM_CONFIG overrides 'BM,BN,BK,warps,stages' (exploration)")
    ap.add_argument("--layer-only", action="store_true", help="only the whole-layer comparison")
    a = ap.parse_args()
    rows = ([] if a.layer_only else projection_rows()) + layer_rows()
    if a.configs:
        rows += config_sweep(a.configs)
    if a.json:
        json.dump(rows, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
