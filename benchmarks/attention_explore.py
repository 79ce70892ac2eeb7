"""Attention kernel exploration on the GPU (one device call): invariance checks of the Triton kernel on the device,
then TFLOP/s of every (block_n, warps, stages) / TMA variant next to cuDNN SDPA, with ``do_bench`` (launch overhead
included) and CUDA-graph replay (kernel only). Writes $OUT/attention_explore.json.

    python benchmarks/attention_explore.py [--variants BN,WARPS,STAGES,TMA ...] [--profile]

TMA=0 reads the current tokens' K/V through pointers instead of TMA descriptors.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bagel_kernels as bk  # noqa: E402
from attention_shapes import HKV, HQ, D, peers  # noqa: E402

SHAPES = [("1024² ctx128", 4098, 128), ("1024² ctx8192", 4098, 8192), ("512² ctx64", 1026, 64),
          ("512² ctx2450", 1026, 2450)]


def device_checks() -> dict:
    """Bitwise invariance on the device: row subsets (aligned and not), varlen vs separate, TMA vs pointers,
    paged vs contiguous context, every output element written."""
    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.bfloat16, torch.float32):
        r = lambda *s: torch.randn(*s, device="cuda", generator=g).to(dt)
        q, k, v, ck, cv = r(1000, 28, 128), r(1000, 4, 128), r(1000, 4, 128), r(300, 4, 128), r(300, 4, 128)
        segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
        out = torch.full_like(q, float("nan"))
        full = bk.joint_attention(q, segs, out=out).out
        res[f"all_written_{dt}"] = not bool(torch.isnan(out).any())
        for a, c in ((128, 512), (3, 517), (999, 1000)):
            res[f"rows_{a}_{c}_{dt}"] = torch.equal(bk.joint_attention(q[a:c].contiguous(), segs).out, full[a:c])
        os.environ["BAGEL_ATTN_TMA"] = "0"
        res[f"tma_vs_pointer_{dt}"] = torch.equal(bk.joint_attention(q, segs).out, full)
        del os.environ["BAGEL_ATTN_TMA"]
        if dt == torch.bfloat16:
            for cfg in ("128,8,2", "128,4,2"):  # warps/stages must not change the bits
                os.environ["BAGEL_ATTN_CONFIG"] = cfg
                try:
                    res[f"config_{cfg}_vs_default"] = torch.equal(bk.joint_attention(q, segs).out, full)
                except Exception as e:  # noqa: BLE001 - e.g. out of shared memory: a result too
                    res[f"config_{cfg}_vs_default"] = type(e).__name__
            del os.environ["BAGEL_ATTN_CONFIG"]
        # paged context (page 16, shuffled pages) == contiguous context
        pages = torch.randperm(40, device="cuda", generator=g)[:19]
        kc = torch.zeros(40, 16, 4, 128, device="cuda", dtype=dt)
        vc = torch.zeros_like(kc)
        kc[pages] = torch.cat([ck, ck.new_zeros(4, 4, 128)]).view(19, 16, 4, 128)
        vc[pages] = torch.cat([cv, cv.new_zeros(4, 4, 128)]).view(19, 16, 4, 128)
        paged = bk.PagedKV(kc, vc, pages[None].int(), torch.tensor([300], device="cuda", dtype=torch.int32))
        res[f"paged_vs_contiguous_{dt}"] = torch.equal(bk.joint_attention(q, [paged, segs[1]]).out, full)
        # varlen: three sequences in one launch == each alone
        lens, clens = [700, 1, 299], [300, 0, 77]
        cu = torch.tensor([0, 700, 701, 1000], device="cuda", dtype=torch.int32)
        ccu = torch.tensor([0, 300, 300, 377], device="cuda", dtype=torch.int32)
        ck2, cv2 = r(377, 4, 128), r(377, 4, 128)
        vl = bk.joint_attention(q, [bk.ContiguousKV(ck2, cv2, cu_seqlens=ccu, max_seqlen=300),
                                    bk.ContiguousKV(k, v, cu_seqlens=cu, max_seqlen=700)],
                                cu_seqlens_q=cu, max_seqlen_q=700).out
        ok = True
        for b in range(3):
            a, c, ca, cc = cu[b].item(), cu[b + 1].item(), ccu[b].item(), ccu[b + 1].item()
            one = bk.joint_attention(q[a:c].contiguous(), [bk.ContiguousKV(ck2[ca:cc], cv2[ca:cc]),
                                                           bk.ContiguousKV(k[a:c], v[a:c])]).out
            ok &= torch.equal(one, vl[a:c])
        res[f"varlen_vs_alone_{dt}"] = bool(ok)
        # chunked resumable == one launch
        st = bk.joint_attention(q, [segs[0], bk.ContiguousKV(k[:512], v[:512])], finalize=False)
        res[f"chunked_{dt}"] = torch.equal(bk.joint_attention(q, [bk.ContiguousKV(k[512:], v[512:])], state=st).out,
                                           full)
        from bagel_kernels.attention_reference import naive_attention
        want = naive_attention(q.cpu(), torch.cat([ck, k]).cpu(), torch.cat([cv, v]).cpu())
        res[f"rel_err_{dt}"] = ((full.double().cpu() - want).norm() / want.norm()).item()
    print("device checks", res, flush=True)
    return res


def profile_host() -> str:
    import cProfile
    import io
    import pstats

    q = torch.randn(1026, HQ, D, device="cuda", dtype=torch.bfloat16)
    k, v = torch.randn(1026, HKV, D, device="cuda", dtype=torch.bfloat16), torch.randn(1026, HKV, D, device="cuda", dtype=torch.bfloat16)
    segs = [bk.ContiguousKV(k[:64], v[:64]), bk.ContiguousKV(k, v)]
    for _ in range(5):
        bk.joint_attention(q, segs)
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(300):
        bk.joint_attention(q, segs)
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[:5000], flush=True)
    return s.getvalue()[:5000]


def bench_pair(fn) -> tuple[float, float]:
    from triton.testing import do_bench, do_bench_cudagraph

    a = do_bench(fn, warmup=30, rep=200, return_mode="median")
    with torch.cuda.stream(torch.cuda.Stream()):
        b = do_bench_cudagraph(fn, rep=100, return_mode="median")
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--variants", nargs="*", default=["128,8,3,1", "128,8,2,1", "64,8,3,1", "128,8,3,0"])
    ap.add_argument("--profile", action="store_true", help="cProfile the host side of 300 calls (512² ctx64)")
    ap.add_argument("--skip-checks", action="store_true")
    a = ap.parse_args()
    log = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    if not a.skip_checks:
        log["checks"] = device_checks()
    if a.profile:
        log["profile"] = profile_host()
    torch.manual_seed(0)
    rows = []
    variants = [(v.rsplit(",", 1)[0], v.rsplit(",", 1)[1]) for v in a.variants]
    for name, nq, nctx in SHAPES:
        dt = torch.bfloat16
        q = torch.randn(nq, HQ, D, device="cuda", dtype=dt)
        k, v = torch.randn(nq, HKV, D, device="cuda", dtype=dt), torch.randn(nq, HKV, D, device="cuda", dtype=dt)
        ck, cv = torch.randn(nctx, HKV, D, device="cuda", dtype=dt), torch.randn(nctx, HKV, D, device="cuda", dtype=dt)
        segs = [bk.ContiguousKV(ck, cv), bk.ContiguousKV(k, v)]
        fl = 4 * HQ * nq * (nq + nctx) * D
        row = {"shape": name}
        p = peers(q, torch.cat([ck, k]), torch.cat([cv, v]))
        if "cudnn" in p:
            t1, t2 = bench_pair(p["cudnn"])
            row["cudnn"] = (fl / t1 / 1e9, fl / t2 / 1e9)
        ref = bk.joint_attention(q, segs).out
        for cfg, tma in variants:
            os.environ["BAGEL_ATTN_CONFIG"], os.environ["BAGEL_ATTN_TMA"] = cfg, tma
            key = f"ours {cfg} tma={tma}"
            try:
                o = bk.joint_attention(q, segs).out
                err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
                t1, t2 = bench_pair(lambda: bk.joint_attention(q, segs))
                row[key] = (fl / t1 / 1e9, fl / t2 / 1e9, f"diff_vs_default={err:.1e}")
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                row[key] = repr(e)[:300]
            print(key, row[key], flush=True)
        for k_ in ("BAGEL_ATTN_CONFIG", "BAGEL_ATTN_TMA"):
            os.environ.pop(k_)
        # host cost of one call (GPU kept busy-free: sync after a batch of calls)
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(200):
            bk.joint_attention(q, segs)
        t_host = (time.perf_counter() - t0) / 200
        torch.cuda.synchronize()
        row["wall_per_call_us_(host_bound_if_>kernel)"] = t_host * 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    log["rows"] = rows
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "attention_explore.json"), "w") as f:
        json.dump(log, f, indent=1)


if __name__ == "__main__":
    main()
