"""The two stages (AR stage 0, diffusion stage 1): single-stage vs split (two processes) end to end, text2img and
img2img, with a large AR decode budget. Runs on CPU with the tiny preset.

    python -m benchmarks.bench_two_stage --preset bagel-7b-mot --device cuda --steps 10 50 --max-tokens 256

Single stage: one process runs stage 0 (prefill of the CFG contexts) and stage 1 (denoise + VAE decode); the image
does not wait for text decoding. Split: stage 0 and stage 1 are two processes (KV connector: ``tensor`` = CUDA IPC
handles on the GPU, ``shm`` = serialized bytes in shared memory; flash_attn -> flashinfer_nhd); stage 0 forwards the KV when it is ready and then decodes ``max_tokens`` tokens
(ignore_eos) while stage 1 denoises. Time = request start (stage 0 starts) to image done (stage 1 done), both
processes' events on the host's monotonic clock; model loading is excluded from both, and both are warmed up
(the split workers serve a 2-step request first, as a running server would be warm).
"""
from __future__ import annotations

import argparse

import torch

from bagel_model.core.sampling import SamplingParams
from bagel_model.pipeline import BagelPipeline
from bagel_model.serving.split import ModelSpec, run_split_processes
from bagel_model.serving.stages import EventLog, Request, run_stage0, run_stage1_batch

from .common import add_output_args, emit, row


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="bench_two_stage", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--size", type=int, default=None, help="image side (default 1024 for the 7B preset, 64 tiny)")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--modes", nargs="+", choices=["text2img", "img2img"], default=["text2img", "img2img"])
    ap.add_argument("--layout1", default="flashinfer_nhd",
                    help="stage 1's cache layout in the split run (the single-stage run keeps stage 0's flash_attn)")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--connector", choices=["tensor", "shm"], default=None,
                    help="split connector (default: tensor = CUDA IPC on GPU, shm on CPU)")
    ap.add_argument("--stage0-sm-percent", type=int, default=None,
                    help="one GPU under MPS (nvidia-cuda-mps-control -d): cap stage 0's share of the SMs "
                         "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) so its decode disturbs the denoiser less")
    ap.add_argument("--stage0-mps-priority", choices=["normal", "below_normal"], default=None,
                    help="one GPU under MPS: stage 0's client priority (CUDA_MPS_CLIENT_PRIORITY 0/1); below_normal "
                         "lets the denoiser's kernels go first")
    ap.add_argument("--stage1-stream-priority", type=int, default=None,
                    help="run stage 1 on a CUDA stream of this priority (-1 or lower: more urgent than the default "
                         "stream stage 0 decodes on)")
    ap.add_argument("--stage0-device", default=None,
                    help="stage 0's device in the split run, e.g. cuda:1 (the AR stage on a second GPU; the "
                         "single-stage run and stage 1 use --device)")
    ap.add_argument("--stage-env", nargs="+", default=[], metavar="STAGE:KEY=VALUE",
                    help="extra environment of one split stage's process, e.g. stage0:CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=50")
    return add_output_args(ap)


def main(argv: list[str] | None = None) -> None:
    ap = build_parser()
    a = ap.parse_args(argv)
    env0 = {}
    if a.stage0_sm_percent:
        env0["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(a.stage0_sm_percent)
    if a.stage0_mps_priority:
        env0["CUDA_MPS_CLIENT_PRIORITY"] = "1" if a.stage0_mps_priority == "below_normal" else "0"
    stage_env = {"stage0": env0}
    for item in a.stage_env:
        stage, _, kv = item.partition(":")
        key, _, value = kv.partition("=")
        if stage not in ("stage0", "stage1") or not key:
            ap.error(f"--stage-env {item!r}: expected stage0:KEY=VALUE or stage1:KEY=VALUE")
        stage_env.setdefault(stage, {})[key] = value
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    size = a.size or (1024 if a.preset == "bagel-7b-mot" else 64)
    spec = ModelSpec(preset=a.preset, seed=0, dtype=dtype, device=a.device, threads=1 if a.device == "cpu" else 4)
    image = (torch.rand(size, size, 3, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)

    def request(mode: str, steps: int) -> Request:
        p = SamplingParams(steps=steps, height=size, width=size)
        if mode == "img2img":
            p = SamplingParams(steps=steps, height=size, width=size, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                               cfg_renorm_type="text_channel")
        return Request(mode, "a photo of a red cube on a wooden table", p, image if mode == "img2img" else None,
                       max_tokens=a.max_tokens, ignore_eos=True)

    rows = []
    model, tok = spec.load()
    pipe = BagelPipeline(model, tok)
    for mode in a.modes:
        for steps in a.steps:
            req = request(mode, steps)
            single_req = Request(req.mode, req.prompt, req.params, req.image, 0)
            if not rows:
                pipe.generate(Request(mode, req.prompt, SamplingParams(steps=2, height=size, width=size),
                                      req.image, 0))  # warm-up (Triton compilation)
            _sync(a.device)
            ev = EventLog()  # pipe.generate's two calls, with their events recorded
            r0 = run_stage0(model, tok, single_req, events=ev)
            (r,) = run_stage1_batch(model, [r0.diffusion], events=ev)
            _sync(a.device)
            e = dict(ev.events)
            rows.append({"mode": mode, "steps": steps, "single_s": e["stage1_done"] - e["stage0_start"],
                         "single_md5": r.image_md5, "single_first_step_after_s": e["dit_step"] - e["stage0_start"]})
            print(rows[-1], flush=True)
    del model, pipe
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    for r in rows:
        req = request(r["mode"], r["steps"])
        warm = Request(req.mode, req.prompt, SamplingParams(steps=2, height=size, width=size), req.image, 2,
                       ignore_eos=True)
        res = run_split_processes(spec, req, layout1=a.layout1, warmup=warm, connector=a.connector,
                                  stage_env=stage_env, stage0_device=a.stage0_device,
                                  stage1_stream_priority=a.stage1_stream_priority)
        ev0, ev1 = dict(res["stage0"]["events"]), dict(res["stage1"]["events"])
        r["split_s"] = ev1["stage1_done"] - ev0["stage0_start"]
        r["split_md5"] = res["stage1"]["image_md5"]
        r["kv_forwarded_after_s"] = ev0["kv_forwarded"] - ev0["stage0_start"]
        r["split_first_step_after_s"] = ev1["dit_step"] - ev0["stage0_start"]  # hand-over cost: vs single's
        r["layout1"] = a.layout1
        r["stage0_decode_end_after_s"] = ev0["stage0_done"] - ev0["stage0_start"]
        r["decoded_tokens"] = len(res["stage0"]["text_ids"])
        r["split/single"] = r["split_s"] / r["single_s"]
        r["connector"] = a.connector or ("tensor" if a.device.startswith("cuda") else "shm")
        r["md5_equal"] = r["split_md5"] == r["single_md5"]
        r.update(stage_env=stage_env, stage0_sm_percent=a.stage0_sm_percent, stage0_mps_priority=a.stage0_mps_priority,
                   stage1_stream_priority=a.stage1_stream_priority, stage0_device=a.stage0_device or a.device)
        print(r, flush=True)
    out = []
    for r in rows:
        shape = (f"{a.preset} {size}² {r['mode']} {r['steps']} steps, max_tokens {a.max_tokens}, "
                 f"{r['connector']} connector, layout1 {a.layout1}, stage 0 on {r['stage0_device']}")
        verdict = "md5 split == single" if r["md5_equal"] else "md5 DIFFERS"
        out.append(row(f"two-stage split ({verdict})", shape, "s/request", r["split_s"], "single stage",
                       r["single_s"]))
        out.append(row("two-stage single", shape, "s/request", r["single_s"]))
        out.append(row("two-stage split", shape, "s to KV forwarded", r["kv_forwarded_after_s"]))
    emit(out, a)


if __name__ == "__main__":
    main()
