"""One GPU call: kernel checks on the device, benchmarks, full-size BAGEL denoise step. Writes $OUT/gpu_session.json.

    python benchmarks/gpu_session.py [--parts kernel,routed,tiny,full,decode,mot,attention] [--gemm-configs C ...]
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

OUT = os.environ.get("OUT", "/tmp")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
log = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
import triton  # noqa: E402

log["triton"] = triton.__version__
print(log, flush=True)


def check_kernel():
    import bagel_kernels as bk
    from bagel_kernels.attention_reference import naive_attention

    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float32, torch.bfloat16):
        q = torch.randn(1000, 28, 128, device="cuda", generator=g).to(dt)
        k = torch.randn(1000, 4, 128, device="cuda", generator=g).to(dt)
        v = torch.randn(1000, 4, 128, device="cuda", generator=g).to(dt)
        ck = torch.randn(300, 4, 128, device="cuda", generator=g).to(dt)
        out = torch.full_like(q, float("nan"))
        r = bk.joint_attention(q, [bk.ContiguousKV(ck, ck), bk.ContiguousKV(k, v)], out=out)
        want = naive_attention(q.cpu(), torch.cat([ck, k]).cpu(), torch.cat([ck, v]).cpu())
        res[f"rel_err_{dt}"] = ((out.double().cpu() - want).norm() / want.norm()).item()
        res[f"nan_{dt}"] = bool(torch.isnan(out).any())
        full = r.out
        sub = bk.joint_attention(q[128:512].contiguous(), [bk.ContiguousKV(ck, ck), bk.ContiguousKV(k, v)]).out
        res[f"row_subset_bitwise_{dt}"] = bool(torch.equal(sub, full[128:512]))
        st = bk.joint_attention(q, [bk.ContiguousKV(ck, ck), bk.ContiguousKV(k[:512], v[:512])], finalize=False)
        ch = bk.joint_attention(q, [bk.ContiguousKV(k[512:], v[512:])], state=st)
        res[f"chunked_bitwise_{dt}"] = bool(torch.equal(ch.out, full))
        hs = bk.joint_attention(q[:, 5:16].contiguous(), [bk.ContiguousKV(ck[:, 0:3], ck[:, 0:3]), bk.ContiguousKV(k[:, 0:3].contiguous(), v[:, 0:3].contiguous())], gqa_group=7, q_head_offset=5).out
        res[f"head_subset_bitwise_{dt}"] = bool(torch.equal(hs, full[:, 5:16]))
    print("kernel checks", res, flush=True)
    return res


def check_routed():
    """Routed kernels on the device: accuracy vs float64, and bitwise row-subset invariance at unaligned offsets."""
    import bagel_kernels as bk

    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    m, k, n = 1000, 3584, 640
    routing = bk.ExpertSegments.from_flags([(i % 300) >= 90 for i in range(m)])
    ids = routing.expert_ids("cuda").long()
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k, device="cuda", generator=g).to(dt)
        for act in (None, "swiglu"):
            p = 2 if act else 1
            w = (torch.randn(2, p, n, k, device="cuda", generator=g) * 0.02).to(dt)
            b = torch.randn(2, p, n, device="cuda", generator=g).to(dt)
            out = bk.routed_linear(x, routing, w, b, activation=act)
            parts = [torch.einsum("mk,mnk->mn", x.double(), w.double()[ids, j]) + b.double()[ids, j] for j in range(p)]
            want = torch.nn.functional.silu(parts[0]) * parts[1] if act else parts[0]
            key = f"{dt}_{act or 'plain'}"
            res[f"rel_err_{key}"] = ((out.double() - want).norm() / want.norm()).item()
            same = all(torch.equal(bk.routed_linear(x[a:c], routing.slice(a, c), w, b, activation=act), out[a:c])
                       for a, c in ((0, 1), (3, 517), (77, 78), (250, 1000), (129, 131)))
            res[f"row_subset_bitwise_{key}"] = same
        nw = torch.randn(2, k, device="cuda", generator=g).to(dt)
        full = bk.routed_rms_norm(x, routing, nw, 1e-6)
        res[f"rms_subset_bitwise_{dt}"] = torch.equal(bk.routed_rms_norm(x[3:517], routing.slice(3, 517), nw, 1e-6), full[3:517])
        ref = bk.routed_rms_norm(x.cpu(), routing, nw.cpu(), 1e-6, backend="reference")
        res[f"rms_rel_err_{dt}"] = ((full.cpu().double() - ref.double()).norm() / ref.double().norm()).item()
    print("routed checks", res, flush=True)
    return res


def full_size_step():
    from bagel_model.config import BagelConfig
    from bagel_model.denoise import SamplingParams
    from bagel_model.model import BagelModel, make_gen_sequence
    from bagel_model.pipeline import single_device_velocities
    from bagel_model.sync_guard import forbid_host_sync
    from bagel_model.cfg import combine_cfg

    res = {}
    cfg = BagelConfig.preset("bagel-7b-mot")
    t0 = time.time()
    model = BagelModel.random(cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    res["build_s"] = time.time() - t0
    res["params_B"] = sum(p.numel() for p in model.parameters()) / 1e9
    model.set_marker_ids(151652, 151653)
    ctx = model.prefill_text(list(range(100, 164)))
    from bagel_model.model import BranchContext
    contexts = {"full": ctx, "text": BranchContext.empty(cfg.num_layers), "img": ctx}
    seq = make_gen_sequence(cfg, 1024, 1024)
    fn = single_device_velocities(model, seq, contexts)
    x = torch.randn(seq.n_latent, 64, device="cuda")
    p = SamplingParams()

    def step():
        vs = fn(x, 0.9, ("full", "text", "img"))
        return x - combine_cfg(vs["full"], vs["text"], vs["img"], text_scale=4.0, img_scale=1.5, renorm_min=0.0,
                               renorm_type="global") * 0.02
    step(); torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(3):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); step(); e.record(); torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    res["step_3branch_ms"] = sorted(times)[1]
    res["peak_mem_GiB"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        with forbid_host_sync(cuda=True):
            step()
        torch.cuda.synchronize()
        res["sync_debug_error_mode"] = "passed"
    except Exception as e:  # noqa: BLE001
        res["sync_debug_error_mode"] = f"FAILED: {type(e).__name__}: {str(e)[:300]}"
    print("full size", res, flush=True)
    return res


def tiny_gpu():
    from bagel_model.cli import main
    rc = main(["--device", "cuda", "--steps", "5", "--out", os.path.join(OUT, "tiny_gpu.png"), "--no-progress"])
    return {"rc": rc}


def mot_bench(configs):
    from mot_shapes import config_sweep, layer_rows, projection_rows

    out = {"projections": projection_rows(), "layer": layer_rows()}
    if configs:
        out["configs"] = config_sweep(configs)
    return out


def decode_check():
    """Small-batch GEMM invariance and graph decoding == eager decoding on the 7B preset (per-token times)."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, os.path.join(here, "decode_profile.py"), "--tokens", "32"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.path.dirname(here)})
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(("small-batch", "decode"))]
    print("\n".join(lines) or out.stderr[-2000:], flush=True)
    return lines or f"ERROR rc={out.returncode}: {out.stderr[-2000:]}"


def attention_bench():
    from attention_shapes import run

    return run(os.path.join(OUT, "attention.json"))


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="kernel,routed,tiny,full,decode,mot,attention")
    ap.add_argument("--gemm-configs", nargs="*", default=None)
    a = ap.parse_args()
    parts = {"kernel": check_kernel, "routed": check_routed, "tiny": tiny_gpu, "full": full_size_step,
             "mot": lambda: mot_bench(a.gemm_configs), "attention": attention_bench, "decode": decode_check}
    for name in a.parts.split(","):
        try:
            log[name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - one failing part must not cost the others their device time
            import traceback
            traceback.print_exc()
            log[name] = f"ERROR {type(e).__name__}: {e}"
        torch.cuda.empty_cache()
        json.dump(log, open(os.path.join(OUT, "gpu_session.json"), "w"), indent=1, default=str)
