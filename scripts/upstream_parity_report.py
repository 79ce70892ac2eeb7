"""How far this project's BAGEL is from ByteDance-Seed/Bagel's own outputs, on any device and dtype.

    python scripts/upstream_parity_report.py                          # fp32 on the CPU (what the parity tests pin)
    python scripts/upstream_parity_report.py --device cuda --dtype bf16

Loads ``tests/fixtures/bagel_upstream_tiny`` (upstream's golden fp32 outputs, see its README) through the public
loader and prints the relative error against upstream at each stage: prefill K/V (worst layer), the per-branch and
CFG-combined velocities at every step from upstream's x_t (worst step), the final latent of a whole denoise from
upstream's initial noise (the packed step), the decoded image (max |uint8 difference|), and the greedy answer's
token ids. The fp32 CPU numbers are what ``tests/test_upstream_parity.py`` asserts (<= 1e-5); bf16 is a
measurement, not a test.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from bagel_model.engine.cfg import combine_cfg
from bagel_model.core.checkpoint import from_pretrained
from bagel_model.core.sampling import SamplingParams
from bagel_model.engine.denoise import DenoiseRequest, denoise
from bagel_model.engine.output import decode_latent
from bagel_model.engine.step import PackedStep
from bagel_model.oracle import branch_velocity
from bagel_model.pipeline import BagelPipeline
from bagel_model.engine.prefill import TextBlock, prefill, vae_block, vit_block
from bagel_model.serving.stages import Request, run_stage0

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures",
                       "bagel_upstream_tiny")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm())


def params_of(case: dict) -> SamplingParams:
    p = case["params"]
    h, w = p["image_hw"]
    return SamplingParams(steps=p["num_timesteps"], seed=0, height=h, width=w, timestep_shift=p["timestep_shift"],
                          cfg_text_scale=p["cfg_text_scale"], cfg_img_scale=p["cfg_img_scale"],
                          cfg_interval=tuple(p["cfg_interval"]), cfg_renorm_min=p["cfg_renorm_min"],
                          cfg_renorm_type=p["cfg_renorm_type"])


def image_case(model, case: dict, contexts: dict) -> dict:
    dev = model.device
    p = params_of(case)
    grid = model.cfg.check_image_size(p.height, p.width)
    v_err = comb_err = 0.0
    for step in case["steps"]:
        vs = {b: branch_velocity(model, step["x_t"].to(dev), step["t"], grid, contexts[b], 16)
              for b in ("full", "text", "img")}
        for ours, theirs in (("full", "v_gen"), ("text", "v_cfg_text"), ("img", "v_cfg_img")):
            v_err = max(v_err, rel(vs[ours], step[theirs]))
        v = combine_cfg(vs["full"], vs["text"], vs["img"], text_scale=step["cfg_text_scale_used"],
                        img_scale=step["cfg_img_scale_used"], renorm_min=p.cfg_renorm_min,
                        renorm_type=p.cfg_renorm_type)
        comb_err = max(comb_err, rel(v, step["v_t"]))
    (x,) = denoise([DenoiseRequest(case["init_noise"].to(dev), p, grid, contexts)], PackedStep(model), progress=False)
    image = decode_latent(model, x, grid).cpu()
    kv = 0.0
    for name, c in contexts.items():
        up = case["contexts"][{"full": "gen", "text": "cfg_text", "img": "cfg_img"}[name]]
        if up["seq_len"] == 0:
            continue
        for layer, (k_ref, v_ref) in enumerate(zip(up["key"], up["value"])):
            k, v = c.cache.read(layer)
            kv = max(kv, rel(k, k_ref), rel(v, v_ref))
    return dict(prefill_kv=kv, branch_velocity=v_err, combined_velocity=comb_err,
                final_latent=rel(x, case["final_latent"]),
                image_max_uint8_diff=int((image.int() - case["image_uint8"].int()).abs().max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="weights dtype (default: fp32)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ref = torch.load(os.path.join(FIXTURE, "reference.pt"), weights_only=True)
    model, tok = from_pretrained(FIXTURE, device=args.device, dtype=DTYPES[args.dtype], byte_tokenizer=True)
    tok = tok.with_special_ids(ref["meta"]["new_token_ids"])
    BagelPipeline(model, tok)
    ids = ref["meta"]["prompt_ids"]
    report = {}
    with torch.no_grad():
        case = ref["cases"]["t2i_cfg3"]
        r0 = run_stage0(model, tok, Request("text2img", "", params_of(case), prompt_ids=ids))
        report["text2img"] = image_case(model, case, r0.diffusion.contexts)
        case = ref["cases"]["edit_cfg3_64x64"]
        image = case["input_image_uint8"]
        vae = vae_block(model, image, seed=0, noise=case["vae_encode"]["eps"].to(args.device))
        vit = vit_block(model, image)
        text = TextBlock(tok.wrap_prompt_ids(ids, model.cfg.llm.vocab_size))
        ctx = {"full": prefill(model, [vae, vit, text])[0], "text": prefill(model, [vae, vit])[0],
               "img": prefill(model, [text])[0]}
        report["img2img"] = image_case(model, case, ctx)
        case = ref["cases"]["text2text"]
        want = [int(t) for t in case["generated_ids"]][1:]  # upstream's first id is the fed <|im_start|>
        r0 = run_stage0(model, tok, Request("text2text", "", params_of(ref["cases"]["t2i_cfg3"]),
                                            max_tokens=len(want), prompt_ids=ids, ignore_eos=True))
        got = r0.text_ids[:len(want)]
        report["text2text"] = dict(token_ids_equal=sum(a == b for a, b in zip(got, want)), of=len(want))
    report["setup"] = dict(device=args.device, dtype=args.dtype, torch=torch.__version__,
                           gpu=torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "")
    print(json.dumps(report, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
