"""Split serving in two processes: stage 0 (AR) and stage 1 (DiT), each with its own copy of the model, joined by
a connector (the KV tensors themselves through CUDA IPC, or serialized bytes in shared memory). Both build the same
weights from a ``ModelSpec``."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.multiprocessing as mp

from bagel_kernels import KernelOptions, default_options

from .checkpoint import from_pretrained
from .config import BagelConfig
from .kv_transfer import SharedMemoryConnector, TensorQueueConnector, abort, recv_payload, send_payload
from .model import BagelModel
from .stages import EventLog, Request, run_stage0, run_stage1
from .tokenizer import BagelTokenizer


@dataclass(frozen=True)
class ModelSpec:
    """How a worker process gets the model: a checkpoint directory, or a preset with seeded random weights."""

    preset: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint: str | None = None
    threads: int = 1
    kernels: KernelOptions = field(default_factory=default_options)

    def load(self):
        torch.set_num_threads(self.threads)
        dtype = getattr(torch, self.dtype)
        if self.checkpoint:
            model, tok = from_pretrained(self.checkpoint, device=self.device, dtype=dtype, kernels=self.kernels)
        else:
            model = BagelModel.random(BagelConfig.preset(self.preset), seed=self.seed, dtype=dtype, device=self.device,
                                      kernels=self.kernels)
            tok = BagelTokenizer.from_directory(None)
        model.set_marker_ids(tok.special["start_of_image"], tok.special["end_of_image"])
        return model, tok


def _stream_context(device: str, priority: int | None):
    """Run a stage's work on a CUDA stream of ``priority`` (lower = more urgent; torch's default stream is the
    least urgent, 0): the GPU's block scheduler then dispatches this stage's pending blocks before those of
    default-priority work sharing the GPU. No-op on CPU or with no priority."""
    if priority is None or not device.startswith("cuda"):
        return contextlib.nullcontext()
    return torch.cuda.stream(torch.cuda.Stream(device=device, priority=priority))


def _stage0_worker(spec: ModelSpec, reqs: list[Request], connector, out_q, ready, timeout: float,
                   env: dict[str, str] | None = None) -> None:
    os.environ.update(env or {})  # before the model (and CUDA) is touched: e.g. this client's MPS SM share
    events = EventLog()
    try:
        model, tok = spec.load()
        for req in reqs:  # warm-up requests first, the reported one last
            events = EventLog()
            ready.wait(timeout=timeout)  # both stages ready: the request starts now (timings exclude loading)
            r = run_stage0(model, tok, req, send=partial(send_payload, connector), events=events)
        if hasattr(connector, "close"):  # tensor connector: our tensors must outlive stage 1's receipt
            connector.close(timeout=timeout)
        out_q.put(("stage0", {"text_ids": r.text_ids, "text": r.text, "events": events.events}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, and stage 1 is woken
        abort(connector)
        out_q.put(("stage0", {"error": f"{type(e).__name__}: {e}", "events": events.events}))


def _stage1_worker(spec: ModelSpec, layout: str, connector, out_q, timeout: float, ready, n_requests: int,
                   env: dict[str, str] | None = None, stream_priority: int | None = None) -> None:
    os.environ.update(env or {})  # before the model (and CUDA) is touched
    events = EventLog()
    try:
        model, _ = spec.load()
        with _stream_context(spec.device, stream_priority):
            for _ in range(n_requests):
                events = EventLog()
                ready.wait(timeout=timeout)
                payload = recv_payload(connector, timeout=timeout, device=model.device)
                r = run_stage1(model, payload, layout=layout, events=events)
        out_q.put(("stage1", {"latent": r.latent.cpu().numpy(), "image": r.image.cpu().numpy(),  # numpy: plain pickles, no fd sharing with an exiting process
                              "latent_md5": r.latent_md5,
                              "image_md5": r.image_md5, "params": r.params.to_dict(), "events": events.events}))
    except BaseException as e:  # noqa: BLE001
        out_q.put(("stage1", {"error": f"{type(e).__name__}: {e}", "events": events.events}))


def run_split_processes(spec: ModelSpec, req: Request, layout1: str = "flashinfer_nhd",
                        timeout: float = 1800.0, warmup: Request | None = None, connector: str | None = None,
                        stage_env: dict[str, dict[str, str]] | None = None, stage0_device: str | None = None,
                        stage1_stream_priority: int | None = None) -> dict:
    """Run stage 0 and stage 1 as two spawned processes; returns both stages' results and their events.

    ``warmup``: a request both processes serve first (kernels loaded, allocator warm), as a running server would be;
    results and events are those of ``req``. ``connector``: "tensor" (the KV tensors themselves: CUDA IPC, no host
    copy — the default on CUDA) or "shm" (serialized bytes in shared memory with a CRC-32 — the default on CPU).
    ``stage_env``: extra environment per stage (``{"stage0": {...}, "stage1": {...}}``), applied in the child before
    CUDA starts — e.g. ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` to cap stage 0's share of the SMs when both stages share
    one GPU under MPS, or ``CUDA_MPS_CLIENT_PRIORITY=1`` to make stage 0 a below-normal-priority MPS client.
    ``stage0_device``: stage 0's device when it is not ``spec.device`` (e.g. "cuda:1": the AR stage on a second
    GPU, as the seeds serve it; the KV then crosses GPUs once, peer to peer). ``stage1_stream_priority``: run stage 1
    on a CUDA stream of that priority (e.g. -1: ahead of stage 0's default-priority decode when both share a GPU)."""
    connector = connector or ("tensor" if spec.device.startswith("cuda") else "shm")
    if connector not in ("tensor", "shm"):
        raise ValueError(f"unknown split connector {connector!r}; expected 'tensor' or 'shm'")

    req.validate()
    spec0 = dataclasses.replace(spec, device=stage0_device) if stage0_device else spec
    if connector == "tensor" and spec0.device.split(":")[0] != spec.device.split(":")[0]:
        raise ValueError(f"stage 0 on {spec0.device!r} and stage 1 on {spec.device!r}: the tensor connector needs "
                         "both stages on the same kind of device (it hands CUDA tensors over by IPC); use 'shm'")
    if req.mode not in ("text2img", "img2img"):
        raise ValueError(f"--split serves image outputs (text2img, img2img); {req.mode} runs in stage 0 alone")
    ctx = mp.get_context("spawn")
    conn = TensorQueueConnector(ctx) if connector == "tensor" else SharedMemoryConnector(ctx)
    out_q, ready = ctx.Queue(), ctx.Barrier(2)
    reqs = ([warmup.validate()] if warmup is not None else []) + [req]
    env = stage_env or {}
    unknown = set(env) - {"stage0", "stage1"}
    if unknown:
        raise ValueError(f"stage_env keys must be 'stage0'/'stage1', got {sorted(unknown)}")
    procs = [ctx.Process(target=_stage0_worker, args=(spec0, reqs, conn, out_q, ready, timeout, env.get("stage0")),
                         name="bagel-stage0"),
             ctx.Process(target=_stage1_worker,
                         args=(spec, layout1, conn, out_q, timeout, ready, len(reqs), env.get("stage1"),
                               stage1_stream_priority),
                         name="bagel-stage1")]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    results: dict = {}
    try:
        while len(results) < 2:
            try:
                name, r = out_q.get(timeout=5.0)
                results[name] = r
                if "error" in r:  # fail fast: the other stage may be waiting for a peer that is gone
                    raise RuntimeError(f"split pipeline {name} failed: {r['error']}")
            except queue.Empty:
                dead = [p.name for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"split pipeline: process {dead} died (exit codes "
                                       f"{[p.exitcode for p in procs]}) before reporting")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"split pipeline: no result within {timeout:.0f} s; have {sorted(results)}")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    for name in ("stage0", "stage1"):
        if "error" in results[name]:
            raise RuntimeError(f"split pipeline {name} failed: {results[name]['error']}")
    results["wall_s"] = time.monotonic() - t0
    return results
