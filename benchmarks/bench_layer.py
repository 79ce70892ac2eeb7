"""One whole BAGEL-7B-MoT layer (routed norms, fused QKV, QK-norm + RoPE, attention over a 128-token context,
o_proj + residual, SwiGLU MLP) at full size, random bf16: ours in exact and fast mode against the eager
mask/scatter layer with cuDNN SDPA (``peers.mask_scatter_layer``). Times with ``do_bench`` (the peer synchronizes).

    python -m benchmarks.bench_layer [--no-csv]
"""
from __future__ import annotations

import argparse
from typing import Iterator

import torch

import bagel_kernels as bk
from bagel_model.core.config import BagelConfig
from bagel_model.core.layers import LayerInputs, MoTDecoderLayer, local_attention

from .common import add_output_args, bench_ms, emit, require_cuda, row
from .peers import mask_scatter_layer
from .shapes import D, H, HKV, token_sets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench_layer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_output_args(p)


def run(args: argparse.Namespace) -> Iterator[dict]:
    cfg = BagelConfig.preset("bagel-7b-mot")
    with torch.device("meta"):
        layer = MoTDecoderLayer(cfg, 0)
    layer = layer.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.02, generator=g)
    cases = {"gen step, 4098 gen tokens, ctx 128": bk.ExpertSegments.uniform(4098, True),
             "i2i prefill, 40 text + 4098 image + 60 text, ctx 128": token_sets()["i2i prefill mixed"]}
    for cname, routing in cases.items():
        m, nctx = routing.num_tokens, 128
        x = torch.randn(m, H, device="cuda", dtype=torch.bfloat16)
        ck, cv = (torch.randn(nctx, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        cos, sin = bk.rope_cos_sin(torch.arange(m, device="cuda") + nctx, D, 1e6)
        mask = routing.expert_ids("cuda").bool()

        def ours(opts: bk.KernelOptions):
            li = LayerInputs(routing=routing, cos=cos, sin=sin, gen_mode=True, kernels=opts)
            return layer(x, li, local_attention([bk.ContiguousKV(ck, cv)], m, options=opts))

        exact, fast = bk.KernelOptions(), bk.KernelOptions(mode="fast")
        with torch.no_grad():
            peer = bench_ms(lambda: mask_scatter_layer(layer, x, mask, cos, sin, ck, cv), graph=False)
            t_exact = bench_ms(lambda: ours(exact), graph=False)
            t_fast = bench_ms(lambda: ours(fast), graph=False)
        # the row's ratio is the speedup, peer ms / ours (benchmarks.common.row: > 1 = ours faster)
        yield row("MoT layer exact", cname, "ms", t_exact, "mask/scatter + cuDNN", peer)
        yield row("MoT layer fast", cname, "ms", t_fast, "mask/scatter + cuDNN", peer)
        yield row("peer mask/scatter + cuDNN", cname, "ms", peer)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    require_cuda("bench_layer")
    emit(run(args), args)


if __name__ == "__main__":
    main()
