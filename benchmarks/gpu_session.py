"""One GPU call: kernel checks on the device, attention benchmarks, full-size BAGEL denoise step. Writes $OUT files."""
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


for name, fn in (("kernel", check_kernel), ("tiny", tiny_gpu), ("full", full_size_step)):
    try:
        log[name] = fn()
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        log[name] = f"ERROR {type(e).__name__}: {e}"
    torch.cuda.empty_cache()
    json.dump(log, open(os.path.join(OUT, "gpu_session.json"), "w"), indent=1, default=str)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_shapes import run  # noqa: E402

for ws in (None, "4,3", "8,2"):
    if ws:
        os.environ["BAGEL_ATTN_WARPS_STAGES"] = ws
    else:
        os.environ.pop("BAGEL_ATTN_WARPS_STAGES", None)
    print("== attention tile warps,stages:", ws or "default 8,3", flush=True)
    try:
        log[f"attention_{ws or 'default'}"] = run(os.path.join(OUT, f"attention_{(ws or 'default').replace(',', '_')}.json"))
    except Exception as e:  # noqa: BLE001
        import traceback
        traceback.print_exc()
        log[f"attention_{ws}"] = f"ERROR {e}"
    json.dump(log, open(os.path.join(OUT, "gpu_session.json"), "w"), indent=1, default=str)
