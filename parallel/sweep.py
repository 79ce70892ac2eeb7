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


def batch_requests(args, params, cfg) -> list:
    """The batched-requests configuration: the sweep's request plus two others (prompt, size, steps, seed, CFG)."""
    from dataclasses import replace

    from bagel_model.core.sampling import CacheConfig

    small = cfg.latent_downsample  # one latent token per side
    # with step caching on: the second request caches nothing and the third uses the other policy (mixed policies
    # in one packed step)
    other = replace(params.cache, policy="dbcache" if params.cache.policy == "fixed" else "fixed")
    return [(args.prompt, params),
            ("a blue ball", replace(params, height=2 * small, width=small, steps=max(2, params.steps - 2),
                                    seed=params.seed + 1, cfg_img_scale=1.0, cache=CacheConfig())),
            ("two green cones", replace(params, height=small, width=3 * small, steps=params.steps + 1,
                                        seed=params.seed + 2, cfg_interval=(0.0, 1.0), cfg_renorm_type="channel",
                                        cache=other if params.cache.enabled else params.cache))]


def config_names(world: int, num_heads: int) -> list[str]:
    """The names ``--only`` accepts for this world size and model."""
    return list(dict.fromkeys(["single"] + [pc.name() for pc in configs_for(world, num_heads)]))


EPILOG = """valid --only names (world 2): {w2}
valid --only names (world 4): {w4}
(for the tiny preset's 6 heads; other worlds: ulysses<U>xring<R>-<exact|fast>xcfg<C> with U*R*C = world)"""


def build_parser() -> argparse.ArgumentParser:
    from bagel_model.cli import DefaultsFormatter, add_cache_args
    from bagel_model.runtime.collectives import DEFAULT_TIMEOUT_S

    class _Formatter(argparse.RawDescriptionHelpFormatter, DefaultsFormatter):
        pass

    p = argparse.ArgumentParser(prog="bagel-sweep", description=__doc__, formatter_class=_Formatter,
                                epilog=EPILOG.format(w2=", ".join(config_names(2, 6)), w4=", ".join(config_names(4, 6))))
    p.add_argument("--config", default="tiny", choices=["tiny", "bagel-7b-mot"],
                   help="embedded preset (ignored with --checkpoint)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory instead of seeded random weights "
                   "(default: none, random weights)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep only the first N layers, 1 <= N <= the preset's (default: all of them)")
    p.add_argument("--prompt", default="a red cube", help="text prompt")
    p.add_argument("--steps", type=int, default=6, help="timesteps (N-1 Euler steps), >= 2")
    p.add_argument("--size", type=int, nargs="+", default=[48, 80], help="height [width] in pixels (multiples of 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--weights-seed", type=int, default=0, help="seed of the random weights (presets only)")
    p.add_argument("--only", default=None, help="comma-separated config names to run (default: all the world "
                   "allows; the names are listed below)")
    p.add_argument("--json", default=None, help="write the results table as JSON (default: no file)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="device of every rank (default: cuda with NCCL when a GPU is present, else cpu with gloo)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank (fixed: reductions, and md5s, "
                   "depend on it)")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="seconds a collective may wait for a peer; a stalled or dead rank makes every other rank "
                        "exit within it, naming the missing rank")
    add_cache_args(p)
    p.add_argument("--kernels", choices=("exact", "fast"), default="exact",
                   help="kernel mode: exact (parallel == single bit for bit) or fast (cuBLAS projections on CUDA: "
                        "changes output bits, parallel configs then match only to rounding and are not counted as "
                        "failures)")
    p.add_argument("--quantization", choices=("none", "fp8"), default="none",
                   help="fp8: FP8 MoT projections (their own exactness class: parallel == single bit for bit among "
                        "FP8 runs, other bits than none); an FP8 checkpoint always runs fp8")
    p.add_argument("--fp8-accumulation", choices=("fast", "promoted"), default="fast",
                   help="with --quantization fp8 on GPUs: the FP8 GEMM's K summation (promoted: its own bits; no "
                        "effect on CPU)")
    p.add_argument("--fp8-activation-scaling", choices=("qkv_bound", "row", "group128"), default="qkv_bound",
                   help="with --quantization fp8: the activations' scales (the batch-invariant ones; group128 runs "
                        "the CPU reference only); each its own bits")
    return p


def check_args(args, world: int, num_heads: int, num_layers: int) -> None:
    """Everything the command line can get wrong, before any work: an error naming the value."""
    names = config_names(world, num_heads)
    if args.only is not None:
        wanted = [n for n in args.only.split(",") if n]
        bad = [n for n in wanted if n not in names]
        if not wanted or bad:
            raise ValueError(f"--only {args.only!r} selects {'unknown config(s) ' + str(bad) if bad else 'nothing'}; "
                             f"valid names for world {world}: {', '.join(names)}")
    if args.layers is not None and not 1 <= args.layers <= num_layers:
        raise ValueError(f"--layers must be in 1..{num_layers} (the preset's layer count), got {args.layers}")
    from bagel_model.cli import cache_from_args

    cache_from_args(args).validate(args.steps, args.layers or num_layers)
    if len(args.size) > 2:
        raise ValueError(f"--size takes height [width], got {len(args.size)} values")
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA GPU is visible")
    if not 0 <= args.seed < 2**63 or not 0 <= args.weights_seed < 2**63:
        raise ValueError("--seed and --weights-seed must be in [0, 2**63)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from bagel_kernels import KernelOptions, token_alignment
    from bagel_model.core.checkpoint import from_pretrained
    from bagel_model.core.config import BagelConfig
    from bagel_model.core.model import BagelModel
    from bagel_model.core.tokenizer import BagelTokenizer
    from bagel_model.engine.denoise import DenoiseRequest, denoise
    from bagel_model.engine.output import tensor_md5
    from bagel_model.engine.step import PackedStep
    from bagel_model.oracle import PerBranchStep
    from bagel_model.cli import cache_from_args
    from bagel_model.pipeline import make_requests
    from bagel_model.serving.stages import Request, prepare_image

    from .context_kv import broadcast_contexts
    from .denoise import ParallelStep
    from .mesh import Mesh, guarded, init_distributed

    from bagel_model.runtime import collectives

    try:  # every rank checks the same arguments before any collective: all fail alike, none waits
        cfg0 = BagelConfig.from_pretrained(args.checkpoint) if args.checkpoint else BagelConfig.preset(args.config)
        check_args(args, int(os.environ.get("WORLD_SIZE", "1")), cfg0.num_heads, cfg0.num_layers)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"bagel-sweep: error: {e}\n")
    # torchrun sets OMP_NUM_THREADS=1; the baseline must use the same reductions as the parallel runs
    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    rank, world = init_distributed(backend="nccl" if use_cuda else "gloo", timeout_s=args.timeout)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if use_cuda else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.checkpoint:
        model, tok = from_pretrained(args.checkpoint, device=device, dtype=dtype)
    else:
        cfg = cfg0
        if args.layers:
            cfg.llm.num_hidden_layers = args.layers
        model = BagelModel.random(cfg, seed=args.weights_seed, dtype=dtype, device=device)
        tok = BagelTokenizer.from_directory(None)
    model.kernels = KernelOptions(mode=args.kernels, quantization="fp8" if model.is_fp8 else args.quantization,
                                  fp8_accumulation=args.fp8_accumulation,
                                  fp8_activation_scaling=args.fp8_activation_scaling)
    model.pack_experts()  # --quantization fp8: quantize the projections now, on every rank alike
    model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
    cfg = model.cfg
    h, w = (args.size * 2)[:2]
    # the request as the pipeline makes it (its defaults, the sweep's size, steps and seed), prefilled as stage 0 does
    (request,) = make_requests(cfg, [args.prompt], "text2img", seeds=[args.seed], steps=args.steps, height=h, width=w,
                               cache=cache_from_args(args))
    params = request.params
    align = token_alignment(device, model.kernels)
    n_lat = (h // cfg.latent_downsample) * (w // cfg.latent_downsample)

    # Baseline: one device, no communication (every rank runs it; rank 0's is the reference): the packed step, and
    # the per-branch oracle it must reproduce bit for bit.
    t0 = time.time()
    prepared = prepare_image(model, tok, request)
    base = denoise([prepared.start(model)], PackedStep(model, align), progress=False)[0]
    base_md5, base_s = tensor_md5(base), time.time() - t0
    rows = [dict(config="single", degrees="1", md5=base_md5, match=True, seconds=round(base_s, 3), mode="exact")]
    failures = 0
    if not params.cache.enabled:  # the oracle has no step cache
        t0 = time.time()
        ref = denoise([prepared.start(model)], PerBranchStep(model, align), progress=False)[0]
        ref_md5 = tensor_md5(ref)
        rows.append(dict(config="single-per-branch", degrees="1", md5=ref_md5, match=ref_md5 == base_md5,
                         seconds=round(time.time() - t0, 3), mode="exact"))
        failures = int(ref_md5 != base_md5 and args.kernels == "exact")

    def shapes(inp) -> dict[str, tuple[int, int]]:  # (length, RoPE position) of the contexts to broadcast
        return {b: (inp.contexts[b].length, inp.contexts[b].rope_position) for b in ("full", "text")}

    def broadcast_request(inp) -> DenoiseRequest:
        """Context KV once per request, from rank 0 (which prefilled it) to everyone."""
        ctx = broadcast_contexts(inp.contexts if rank == 0 else None, shapes(inp), model)
        ctx["img"] = ctx["full"]
        return DenoiseRequest.start(cfg, inp.params, ctx, model.device)

    # Batched requests: other prompts, sizes, step counts, seeds and CFG settings in one packed step; each must give
    # the md5 it gives alone on one device.
    batch = [prepare_image(model, tok, Request("text2img", pr, pp, request_id=f"request-{i}"))
             for i, (pr, pp) in enumerate(batch_requests(args, params, cfg))]
    solo = [tensor_md5(denoise([inp.start(model)], PackedStep(model, align), progress=False)[0]) for inp in batch]
    wanted = set(args.only.split(",")) if args.only else None
    configs = configs_for(world, cfg.num_heads)
    # batched requests on: the last config (cfg3 with an idle rank, or plain cfg on small worlds), every exact CFG x SP
    # config, and the hybrid SP config (Ulysses x Ring) when the world has one
    batch_on = {configs[-1].name()} | {pc.name() for pc in configs if pc.sp > 1 and pc.ring_mode == "exact"
                                       and (pc.cfg > 1 or (pc.ring > 1 and pc.ulysses > 1))}
    for pc in configs:
        if wanted and pc.name() not in wanted:
            continue
        mesh = Mesh.build(pc, cfg.num_heads)
        guarded(f"{pc.name()}: barrier before the run", dist.barrier)
        t0 = time.time()
        req = broadcast_request(prepared)
        x = None
        with CollectiveCounter() as counter:
            if mesh.active:
                x = denoise([req], ParallelStep(model, mesh, align), progress=False)[0]
        guarded(f"{pc.name()}: barrier after the run", dist.barrier)
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
        if pc.name() in batch_on:
            guarded(f"{pc.name()}: barrier before the batch", dist.barrier)
            t0 = time.time()
            reqs = [broadcast_request(inp) for inp in batch]
            xs = denoise(reqs, ParallelStep(model, mesh, align), progress=False) if mesh.active else None
            guarded(f"{pc.name()}: barrier after the batch", dist.barrier)
            if mesh.active and mesh.rank == 0:
                md5s = [tensor_md5(x) for x in xs]
                ok = md5s == solo
                rows.append(dict(config=f"batch{len(reqs)}-{pc.name()}", degrees=f"u{pc.ulysses} r{pc.ring} c{pc.cfg}",
                                 md5=md5s[0], md5s=md5s, match=ok, seconds=round(time.time() - t0, 3), mode="exact"))
                failures += int(not ok and args.kernels == "exact")
        # every rank learns the verdict so that all exit with the same code
        flag = torch.tensor([failures], dtype=torch.int64, device=device)
        guarded(f"{pc.name()}: verdict broadcast", dist.broadcast, flag, src=0)
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
    guarded("final barrier", dist.barrier)
    collectives.shutdown()  # leaving on purpose: peers must not take this rank's silence for a failure
    dist.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
