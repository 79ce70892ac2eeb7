"""``bagel-sweep``: prove every parallel configuration reproduces the single-device latent bit for bit.

    torchrun --nproc-per-node 4 -m parallel.sweep            # CPU/gloo on a laptop; NCCL when CUDA is present

Runs the single-device baseline, then every configuration the world size allows (Ulysses, Ring exact/fast,
hybrid, CFG, CFG x SP), prints a table (config, degrees, md5 of the final latent, match, seconds) and exits
non-zero on any exact-mode mismatch. Fast modes (classic ring + LSE merge) are reported with their max error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def configs_for(world: int, num_heads: int) -> list:
    from .mesh import ParallelConfig

    out = []
    for c in (1, 2, 3):
        for r in range(1, world + 1):
            for u in range(1, world + 1):
                if u * r * c != world or u > num_heads:
                    continue
                modes = ("exact", "fast") if r > 1 else ("exact",)
                out.extend(ParallelConfig(ulysses=u, ring=r, cfg=c, ring_mode=m) for m in modes)
    if world > 3:
        out.append(ParallelConfig(cfg=3))  # CFG 3 with idle ranks
    return out


class CollectiveCounter:
    """Counts collectives issued through torch.distributed while active (the CFG loop must issue no broadcast)."""

    NAMES = ("broadcast", "all_gather", "all_to_all_single", "batch_isend_irecv")

    def __init__(self):
        self.counts = {n: 0 for n in self.NAMES}
        self._saved = {}

    def __enter__(self):
        for n in self.NAMES:
            orig = getattr(dist, n)
            self._saved[n] = orig

            def wrapped(*a, _orig=orig, _n=n, **k):
                self.counts[_n] += 1
                return _orig(*a, **k)
            setattr(dist, n, wrapped)
        return self

    def __exit__(self, *exc):
        for n, f in self._saved.items():
            setattr(dist, n, f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bagel-sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tiny", help="preset (tiny | bagel-7b-mot); ignored with --checkpoint")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory instead of seeded random weights")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick full-size runs)")
    p.add_argument("--prompt", default="a red cube")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--size", type=int, nargs="+", default=[48, 80], help="height [width] in pixels (multiples of 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", default=None, help="comma-separated config names to run (default: all)")
    p.add_argument("--json", default=None, help="write the results table as JSON")
    p.add_argument("--kernels", choices=("exact", "fast"), default="exact",
                   help="kernel mode: exact (default; parallel == single bit for bit) or fast (cuBLAS projections "
                        "on CUDA: changes output bits, parallel configs then match only to rounding and are not "
                        "counted as failures)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # torchrun sets OMP_NUM_THREADS=1; the baseline must use the same reductions
    from bagel_kernels import KernelOptions, token_alignment
    from bagel_model.checkpoint import from_pretrained
    from bagel_model.config import BagelConfig
    from bagel_model.denoise import SamplingParams, denoise, initial_noise, timestep_schedule
    from bagel_model.model import BagelModel, make_gen_sequence
    from bagel_model.pipeline import single_device_velocities, tensor_md5, text_to_image_contexts
    from bagel_model.tokenizer import BagelTokenizer

    from .context_kv import broadcast_contexts
    from .denoise import parallel_velocities
    from .mesh import Mesh, init_distributed

    rank, world = init_distributed()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint:
        model, tok = from_pretrained(args.checkpoint, device=device, dtype=dtype)
    else:
        cfg = BagelConfig.preset(args.config)
        if args.layers:
            cfg.llm.num_hidden_layers = args.layers
        model, tok = BagelModel.random(cfg, seed=args.seed, dtype=dtype, device=device), BagelTokenizer.from_directory(None)
    model.kernels = KernelOptions(mode=args.kernels)
    model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    cfg = model.cfg
    h, w = (args.size * 2)[:2]
    params = SamplingParams(steps=args.steps, seed=args.seed, height=h, width=w,
                            timestep_shift=cfg.generation.timestep_shift).validate()
    align = token_alignment(device, model.kernels)
    schedule = timestep_schedule(params.steps, params.timestep_shift)
    n_lat = (h // cfg.latent_downsample) * (w // cfg.latent_downsample)
    x0 = initial_noise(n_lat, cfg.patch_latent_dim, params.seed).to(device)

    # Baseline: one device, no communication (every rank runs it; rank 0's is the reference).
    t0 = time.time()
    contexts = text_to_image_contexts(model, tok, args.prompt)
    seq1 = make_gen_sequence(cfg, h, w, 1, align)
    base = denoise(x0, params, single_device_velocities(model, seq1, contexts), progress=False, schedule=schedule)
    base_md5, base_s = tensor_md5(base), time.time() - t0
    rows = [dict(config="single", degrees="1", md5=base_md5, match=True, seconds=round(base_s, 3), mode="exact")]
    prompt_len = len(tok.encode_prompt(args.prompt))
    lengths = {"full": prompt_len, "text": 0, "img": prompt_len}
    kv_shape = (cfg.num_kv_heads, cfg.head_dim)
    failures = 0
    wanted = set(args.only.split(",")) if args.only else None
    for pc in configs_for(world, cfg.num_heads):
        if wanted and pc.name() not in wanted:
            continue
        mesh = Mesh.build(pc, cfg.num_heads)
        dist.barrier()
        t0 = time.time()
        # Context KV once per request, from rank 0 (which prefilled it) to everyone.
        ctx = broadcast_contexts(contexts if rank == 0 else None, ["full", "text"], cfg.num_layers, lengths,
                                 kv_shape, dtype, device)
        ctx["img"] = ctx["full"]
        x = None
        with CollectiveCounter() as counter:
            if mesh.active:
                seq = make_gen_sequence(cfg, h, w, pc.sp, align)
                x = denoise(x0, params, parallel_velocities(model, seq, ctx, mesh), progress=False, schedule=schedule)
        dist.barrier()
        secs = time.time() - t0
        if mesh.active and mesh.rank == 0:
            md5 = tensor_md5(x)
            match = md5 == base_md5
            err = float((x.float() - base.float()).abs().max())
            row = dict(config=pc.name(), degrees=f"u{pc.ulysses} r{pc.ring} c{pc.cfg}", md5=md5, match=match,
                       seconds=round(secs, 3), mode=pc.ring_mode if pc.ring > 1 else "exact", max_abs_err=err,
                       collectives=counter.counts)
            rows.append(row)
            if not match and row["mode"] == "exact" and args.kernels == "exact":
                failures += 1
        # every rank learns the verdict so that all exit with the same code
        flag = torch.tensor([failures], dtype=torch.int64, device=device)
        dist.broadcast(flag, src=0)
        failures = int(flag.item())
    if rank == 0:
        print(f"\nbagel-sweep: preset {cfg.name}, world {world}, {h}x{w} ({n_lat} latent tokens + 2 markers), "
              f"{params.steps} steps, align {align}, device {device.type}")
        print(f"{'config':<28}{'degrees':<12}{'md5':<34}{'match':<8}{'seconds':>8}")
        for r in rows:
            tag = "yes" if r["match"] else ("NO" if r["mode"] == "exact" else f"~{r['max_abs_err']:.1e}")
            print(f"{r['config']:<28}{r['degrees']:<12}{r['md5']:<34}{tag:<8}{r['seconds']:>8.2f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(world=world, preset=cfg.name, size=[h, w], steps=params.steps, rows=rows), f, indent=1)
        print("ALL EXACT CONFIGS MATCH" if failures == 0 else f"{failures} EXACT CONFIG(S) MISMATCH", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
