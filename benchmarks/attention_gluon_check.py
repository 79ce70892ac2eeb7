"""Device check + timing of the warp-specialized Gluon attention against the Triton kernel and cuDNN.

Run on a Hopper GPU: ``python benchmarks/attention_gluon_check.py [--json OUT] [--skip-bench]``.
1. bits: output and LSE of the Gluon kernel equal the Triton kernel's bit for bit over contiguous and paged contexts
   (every KV-cache layout, pages of 16 and 256, garbage in unwritten slots and padding rows), varlen batches,
   GQA / Ulysses head slices, odd lengths, fp16; every output element written (NaN-poisoned output buffer).
2. speed (CUDA-graph replay): BAGEL's attention shapes, Gluon / Triton / cuDNN SDPA in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import bagel_kernels as bk  # noqa: E402
from bagel_kernels.attention_gluon import SCHEDULES, gluon_attention_supported  # noqa: E402

DEV = "cuda"


def rnd(*shape, dtype=torch.bfloat16, gen=None):
    return torch.randn(*shape, generator=gen, device=DEV, dtype=torch.float32).to(dtype)


def paged(ks, vs, layout, block_size, gen):
    """Per-sequence K/V in a paged cache of ``layout``, shuffled pages, NaN in every slot no sequence owns."""
    lens = [x.shape[0] for x in ks]
    pages = [max(1, -(-n // block_size)) for n in lens]
    nb = sum(pages) + 3
    perm = torch.randperm(nb, device="cpu")
    table = torch.zeros(len(ks), max(pages), dtype=torch.int32)
    raw = bk.allocate_kv_cache(layout, nb, block_size, ks[0].shape[1], ks[0].shape[2], dtype=ks[0].dtype, device=DEV)
    view = bk.normalize_kv_cache(raw, layout)
    view.k.fill_(float("nan"))
    view.v.fill_(float("nan"))
    i = 0
    for b, (kb, vb) in enumerate(zip(ks, vs)):
        table[b, :pages[b]] = perm[i:i + pages[b]].to(torch.int32)
        i += pages[b]
        bk.kv_layout.write_tokens(view, table[b].to(DEV), 0, kb, vb)
    return bk.PagedKV(view.k, view.v, table.to(DEV), torch.tensor(lens, dtype=torch.int32, device=DEV))


def padded_cur(k, v, pad):
    """Current tokens with ``pad`` NaN rows after the real ones (seqlens says how many are real)."""
    nanrows = torch.full((pad, *k.shape[1:]), float("nan"), dtype=k.dtype, device=DEV)
    return bk.ContiguousKV(torch.cat([k, nanrows]), torch.cat([v, nanrows]),
                           seqlens=torch.tensor([k.shape[0]], dtype=torch.int32, device=DEV))


def run_both(q, segs, **kw):
    outs = {}
    for flag in ("0", "1"):
        os.environ["BAGEL_ATTN_GLUON"] = flag
        out = torch.full_like(q, float("nan"))
        res = bk.joint_attention(q, segs, out=out, **kw)
        outs[flag] = res
    os.environ["BAGEL_ATTN_GLUON"] = "1"
    return outs["0"], outs["1"]


def naive(q, ks, vs, g):
    """float64 attention of one sequence over concatenated keys."""
    k = torch.cat(ks).double().repeat_interleave(g, 1)
    v = torch.cat(vs).double().repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(q.shape[2])
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v)


def cases(gen):
    """(name, q, segments, kwargs, float64 reference or None)."""
    out = []
    for nq, nctx, hq, hkv, pad in ((4098, 128, 28, 4, 0), (4098, 8192, 28, 4, 0), (1, 0, 28, 4, 0),
                                   (17, 1, 4, 4, 5), (300, 130, 8, 4, 200), (1000, 0, 28, 4, 77)):
        q, k, v = rnd(nq, hq, 128, gen=gen), rnd(nq, hkv, 128, gen=gen), rnd(nq, hkv, 128, gen=gen)
        segs = []
        ck = cv = None
        if nctx:
            ck, cv = rnd(nctx, hkv, 128, gen=gen), rnd(nctx, hkv, 128, gen=gen)
            segs.append(bk.ContiguousKV(ck, cv))
        segs.append(padded_cur(k, v, pad) if pad else bk.ContiguousKV(k, v))
        ref = naive(q, ([ck] if nctx else []) + [k], ([cv] if nctx else []) + [v], hq // hkv) if nq <= 1000 else None
        out.append((f"contiguous nq={nq} ctx={nctx} hq={hq}/{hkv} pad={pad}", q, segs, {}, ref))
    for layout in bk.LAYOUTS:
        for bs, nctx in ((16, 1000), (256, 300)):
            q, k, v = rnd(517, 28, 128, gen=gen), rnd(517, 4, 128, gen=gen), rnd(517, 4, 128, gen=gen)
            ck, cv = rnd(nctx, 4, 128, gen=gen), rnd(nctx, 4, 128, gen=gen)
            ctx = paged([ck], [cv], layout, bs, gen)
            out.append((f"paged {layout} page={bs} ctx={nctx}", q, [ctx, padded_cur(k, v, 11)], {},
                        naive(q, [ck, k], [cv, v], 7)))
    # the model's denoise call: paged context (16-token pages), current tokens with seqlens
    q, k, v = rnd(4098, 28, 128, gen=gen), rnd(4098, 4, 128, gen=gen), rnd(4098, 4, 128, gen=gen)
    ck, cv = rnd(1057, 4, 128, gen=gen), rnd(1057, 4, 128, gen=gen)
    out.append(("paged flash_attn page=16 ctx=1057, nq=4098 (denoise)", q,
                [paged([ck], [cv], "flash_attn", 16, gen), padded_cur(k, v, 0)], {}, None))
    # context only (a paged cache alone)
    q = rnd(77, 28, 128, gen=gen)
    out.append(("paged alone flashinfer_hnd ctx=1057", q, [paged([ck], [cv], "flashinfer_hnd", 16, gen)], {},
                naive(q, [ck], [cv], 7)))
    # three CFG branches in one varlen launch: contiguous contexts 64/0/64, and a paged variant
    nqs, ctxs = [1000, 1000, 1000], [64, 0, 64]
    cu = torch.tensor([0, *torch.tensor(nqs).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    ccu = torch.tensor([0, *torch.tensor(ctxs).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    q, k, v = rnd(3000, 28, 128, gen=gen), rnd(3000, 4, 128, gen=gen), rnd(3000, 4, 128, gen=gen)
    ck, cv = rnd(128, 4, 128, gen=gen), rnd(128, 4, 128, gen=gen)
    segs = [bk.ContiguousKV(ck, cv, cu_seqlens=ccu, max_seqlen=64), bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=1000)]
    out.append(("varlen 3 branches contiguous ctx 64/0/64", q, segs, dict(cu_seqlens_q=cu, max_seqlen_q=1000), None))
    cul = torch.tensor([0, 333, 340, 1001], dtype=torch.int32, device=DEV)
    cks = [rnd(n, 4, 128, gen=gen) for n in (100, 0, 17)]
    cvs = [rnd(n, 4, 128, gen=gen) for n in (100, 0, 17)]
    cks[1] = cvs[1] = torch.empty(0, 4, 128, dtype=torch.bfloat16, device=DEV)
    q, k, v = rnd(1001, 28, 128, gen=gen), rnd(1001, 4, 128, gen=gen), rnd(1001, 4, 128, gen=gen)
    segs = [paged(cks, cvs, "flashinfer_nhd", 16, gen), bk.ContiguousKV(k, v, cu_seqlens=cul, max_seqlen=661)]
    out.append(("varlen paged 333/7/661 ctx 100/0/17", q, segs, dict(cu_seqlens_q=cul, max_seqlen_q=661), None))
    # a Ulysses rank's head slice: query heads 7..13 of 28 read KV head 1 only
    q, k, v = rnd(700, 7, 128, gen=gen), rnd(700, 1, 128, gen=gen), rnd(700, 1, 128, gen=gen)
    out.append(("ulysses slice heads 7..13 group 7", q, [bk.ContiguousKV(k, v)], dict(gqa_group=7, q_head_offset=7),
                naive(q, [k], [v], 7)))
    q, k, v = (rnd(333, 28, 128, dtype=torch.float16, gen=gen), rnd(333, 4, 128, dtype=torch.float16, gen=gen),
               rnd(333, 4, 128, dtype=torch.float16, gen=gen))
    out.append(("fp16 nq=333", q, [bk.ContiguousKV(k, v)], {}, naive(q, [k], [v], 7)))
    return out


def check_bits() -> list[dict]:
    gen = torch.Generator(device=DEV).manual_seed(0)
    rows = []
    for name, q, segs, kw, ref in cases(gen):
        used = gluon_attention_supported(q, segs, None, None, True, None)
        tri, glu = run_both(q, segs, **kw)
        row = {"case": name, "gluon_used": used,
               "out_bits_equal": bool(torch.equal(tri.out, glu.out)),
               "lse_bits_equal": bool(torch.equal(tri.lse, glu.lse)),
               "nan_in_out": bool(torch.isnan(glu.out).any()),
               "max_abs_diff": float((tri.out.float() - glu.out.float()).abs().max())}
        if ref is not None:
            row["rel_err_vs_f64"] = float((glu.out.double() - ref).norm() / ref.norm())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench(fn) -> float:
    from triton.testing import do_bench_cudagraph

    with torch.cuda.stream(torch.cuda.Stream()):
        return do_bench_cudagraph(fn, rep=200, return_mode="median")


def _use_schedule(name: str) -> None:
    os.environ["BAGEL_ATTN_SCHEDULE"] = name


def timing(schedules: list[str], with_paged: bool) -> list[dict]:
    """TFLOP/s per shape: the Gluon kernel under each block schedule, the Triton kernel, cuDNN."""
    from attention_shapes import HKV, HQ, SHAPES, peers

    gen = torch.Generator(device=DEV).manual_seed(1)
    rows = []
    for name, nq, nctx in SHAPES:
        q, k, v = rnd(nq, HQ, 128, gen=gen), rnd(nq, HKV, 128, gen=gen), rnd(nq, HKV, 128, gen=gen)
        ck, cv = rnd(nctx, HKV, 128, gen=gen), rnd(nctx, HKV, 128, gen=gen)
        flops = 4 * HQ * nq * (nq + nctx) * 128
        variants = {"contiguous": [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]}
        if with_paged:
            variants["paged16"] = [paged([ck], [cv], "flash_attn", 16, gen), bk.ContiguousKV(k, v)]
        row = {"shape": name}
        for vname, segs in variants.items():
            for sched in schedules:
                _use_schedule(sched)
                row[f"gluon_{sched}_{vname}"] = flops / (bench(lambda: bk.joint_attention(q, segs)) * 1e-3) / 1e12
            os.environ["BAGEL_ATTN_GLUON"] = "0"
            row[f"triton_{vname}"] = flops / (bench(lambda: bk.joint_attention(q, segs)) * 1e-3) / 1e12
            os.environ["BAGEL_ATTN_GLUON"] = "1"
        f = peers(q, torch.cat([ck, k]), torch.cat([cv, v])).get("cudnn")
        row["cudnn"] = flops / (bench(f) * 1e-3) / 1e12 if f else float("nan")
        for sched in schedules:
            row[f"{sched}/cudnn"] = row[f"gluon_{sched}_contiguous"] / row["cudnn"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    # the three CFG branches in one varlen launch (contexts 64, 0, 64) vs three cuDNN launches
    nq, ctxs = 4098, [64, 0, 64]
    q, k, v = rnd(3 * nq, HQ, 128, gen=gen), rnd(3 * nq, HKV, 128, gen=gen), rnd(3 * nq, HKV, 128, gen=gen)
    ck = rnd(sum(ctxs), HKV, 128, gen=gen)
    cu = torch.tensor([0, nq, 2 * nq, 3 * nq], dtype=torch.int32, device=DEV)
    ccu = torch.tensor([0, 64, 64, 128], dtype=torch.int32, device=DEV)
    segs = [bk.ContiguousKV(ck, ck, cu_seqlens=ccu, max_seqlen=64), bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=nq)]
    flops = sum(4 * HQ * nq * (nq + c) * 128 for c in ctxs)
    row = {"shape": "3-branch CFG varlen (ctx 64,0,64)"}
    for sched in schedules:
        _use_schedule(sched)
        ms = bench(lambda: bk.joint_attention(q, segs, cu_seqlens_q=cu, max_seqlen_q=nq))
        row[f"gluon_{sched}_contiguous"] = flops / (ms * 1e-3) / 1e12
    sdpa_ms = 0.0
    for b, c in enumerate(ctxs):
        sl = slice(b * nq, (b + 1) * nq)
        f = peers(q[sl], torch.cat([ck[ccu[b]:ccu[b] + c], k[sl]]), torch.cat([ck[ccu[b]:ccu[b] + c], v[sl]]))["cudnn"]
        sdpa_ms += bench(f)
    row["cudnn"] = flops / (sdpa_ms * 1e-3) / 1e12
    for sched in schedules:
        row[f"{sched}/cudnn"] = row[f"gluon_{sched}_contiguous"] / row["cudnn"]
    rows.append(row)
    print(json.dumps(row), flush=True)
    _use_schedule(schedules[0])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--skip-bench", action="store_true", help="bits only")
    ap.add_argument("--skip-bits", action="store_true", help="timing only")
    ap.add_argument("--schedules", nargs="+", default=["auto"], choices=["auto", *sorted(SCHEDULES)],
                    help="the Gluon kernel's key-block schedules to check and time (BAGEL_ATTN_SCHEDULE)")
    ap.add_argument("--paged", action="store_true", help="also time a paged (16-token pages) context")
    args = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bits": []}
    if not args.skip_bits:
        for sched in args.schedules:
            _use_schedule(sched)
            res["bits"] += [{"schedule": sched, **r} for r in check_bits()]
    if not args.skip_bench:
        res["timing"] = timing(args.schedules, args.paged)
    bad = [r for r in res["bits"] if not (r["gluon_used"] and r["out_bits_equal"] and r["lse_bits_equal"])
           or r["nan_in_out"]]
    res["all_bits_equal"] = not bad
    print("ALL BITS EQUAL" if not bad else f"{len(bad)} CASES DIFFER", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
