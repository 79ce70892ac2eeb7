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

from ..core.checkpoint import from_pretrained
from ..core.config import BagelConfig
from ..core.model import BagelModel
from ..core.tokenizer import BagelTokenizer
from .connectors import SharedMemoryConnector, TensorQueueConnector, abort, recv_payload, send_payload
from .payload import new_run_key
from .stages import EventLog, Request, run_stage0, run_stage1


@dataclass(frozen=True)
class ModelSpec:
    """How a worker process gets the model: a checkpoint directory, or a preset with seeded random weights."""

    preset: str = "tiny"
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint: str | None = None
    threads: int = 1
    byte_tokenizer: bool = False  # checkpoint without tokenizer.json: use the built-in byte-level one
    kernels: KernelOptions = field(default_factory=default_options)

    def load(self):
        torch.set_num_threads(self.threads)
        if self.device.startswith("cuda"):
            # Make this stage's GPU the current one: Triton launches on the current device, and a tensor of another
            # GPU then fails as "Pointer argument cannot be accessed from Triton (cpu tensor?)" (stage 0 on cuda:1
            # while the process's current device stayed cuda:0).
            dev = torch.device(self.device)
            if dev.index is not None:  # plain "cuda" keeps the current device
                torch.cuda.set_device(dev)
        dtype = getattr(torch, self.dtype)
        if self.checkpoint:
            model, tok = from_pretrained(self.checkpoint, device=self.device, dtype=dtype,
                                         byte_tokenizer=self.byte_tokenizer, kernels=self.kernels)
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


def _die_with_parent(parent_pid: int) -> None:
    """A stage must not outlive the process that started it (a killed parent left both stages running to the
    end): Linux delivers SIGKILL on the parent's death (prctl PR_SET_PDEATHSIG); elsewhere a thread watches."""
    import signal
    import threading

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # PR_SET_PDEATHSIG = 1
            raise OSError(ctypes.get_errno(), "prctl")
    except (OSError, AttributeError):
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(0.5)
            os._exit(1)
        threading.Thread(target=watch, name="bagel-parent-watch", daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


class _FaultAt(EventLog):
    """Tests only: SIGKILL this process when it records event ``name`` (a stage dying at a chosen phase)."""

    def __init__(self, name: str | None):
        super().__init__()
        self._die_at = name

    def record(self, name: str) -> None:
        super().record(name)
        if name == self._die_at:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


def _stage0_worker(spec: ModelSpec, reqs: list[Request], connector, out_q, ready, timeout: float,
                   env: dict[str, str] | None = None, parent_pid: int | None = None, die_at: str | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    os.environ.update(env or {})  # before the model (and CUDA) is touched: e.g. this client's MPS SM share
    events = EventLog()
    try:
        model, tok = spec.load()
        for req in reqs:  # warm-up requests first, the reported one last
            events = _FaultAt(die_at) if req is reqs[-1] else EventLog()
            ready.wait(timeout=timeout)  # both stages ready: the request starts now (timings exclude loading)
            r = run_stage0(model, tok, req, send=partial(send_payload, connector), events=events)
        if hasattr(connector, "close"):  # tensor connector: our tensors must outlive stage 1's receipt
            connector.close(timeout=timeout)
        out_q.put(("stage0", {"text_ids": r.text_ids, "text": r.text, "events": events.events}))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, and stage 1 is woken
        abort(connector)
        out_q.put(("stage0", {"error": f"{type(e).__name__}: {e}", "events": events.events}))
    finally:
        out_q.close()
        out_q.join_thread()


def _stage1_worker(spec: ModelSpec, layout: str, connector, out_q, timeout: float, ready, request_ids: list[str],
                   env: dict[str, str] | None = None, stream_priority: int | None = None,
                   parent_pid: int | None = None, die_at: str | None = None) -> None:
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    os.environ.update(env or {})  # before the model (and CUDA) is touched
    events = EventLog()
    try:
        model, _ = spec.load()
        with _stream_context(spec.device, stream_priority):
            for i, rid in enumerate(request_ids):
                events = _FaultAt(die_at) if i == len(request_ids) - 1 else EventLog()
                ready.wait(timeout=timeout)
                # checked against this model and the request it answers: a wrong payload is an error, not an image
                payload = recv_payload(connector, timeout=timeout, device=model.device, model=model, request_id=rid)
                events.record("kv_received")
                r = run_stage1(model, payload, layout=layout, events=events)
        out_q.put(("stage1", {"latent": r.latent.cpu().numpy(), "image": r.image.cpu().numpy(),  # numpy: plain pickles, no fd sharing with an exiting process
                              "latent_md5": r.latent_md5,
                              "image_md5": r.image_md5, "params": r.params.to_dict(), "events": events.events}))
    except BaseException as e:  # noqa: BLE001
        out_q.put(("stage1", {"error": f"{type(e).__name__}: {e}", "events": events.events}))
    finally:
        out_q.close()
        out_q.join_thread()  # the result reaches the pipe before this process may exit


def run_split_processes(spec: ModelSpec, req: Request, layout1: str = "flashinfer_nhd",
                        timeout: float = 1800.0, warmup: Request | None = None, connector: str | None = None,
                        stage_env: dict[str, dict[str, str]] | None = None, stage0_device: str | None = None,
                        stage1_stream_priority: int | None = None,
                        _faults: dict[str, str] | None = None) -> dict:
    """Run stage 0 and stage 1 as two spawned processes; returns both stages' results and their events.

    ``warmup``: a request both processes serve first (kernels loaded, allocator warm), as a running server would be;
    results and events are those of ``req``. ``connector``: "tensor" (the KV tensors themselves: CUDA IPC, no host
    copy — the default on CUDA) or "shm" (serialized bytes in shared memory with a CRC-32 — the default on CPU).
    ``stage_env``: extra environment per stage (``{"stage0": {...}, "stage1": {...}}``), applied in the child before
    CUDA starts — e.g. ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` to cap stage 0's share of the SMs when both stages share
    one GPU under MPS, or ``CUDA_MPS_CLIENT_PRIORITY=1`` to make stage 0 a below-normal-priority MPS client.
    ``stage0_device``: stage 0's device when it is not ``spec.device`` (e.g. "cuda:1": the AR stage on a second GPU,
    as a serving deployment places it; the KV then crosses GPUs once, peer to peer). ``stage1_stream_priority``: run
    stage 1 on a CUDA stream of that priority (e.g. -1: ahead of stage 0's default-priority decode when both share a
    GPU).

    Failures: a stage that dies or fails is noticed within a fraction of a second. If stage 0 fails after stage 1
    holds its KV (during stage 0's decode), stage 1 still finishes and the image is returned, with
    ``results["stage0"]["error"]`` saying what was lost (its text); otherwise the error names the stage. Both stages
    die with this process. ``_faults`` (tests only): ``{"stage0"|"stage1": event}`` SIGKILLs that stage when it
    records the event (e.g. "kv_forwarded": stage 0 after sending, during its decode)."""
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
    key = new_run_key()  # this run's HMAC key: reaches the stages inside the connector, over spawn's private pipe
    conn = TensorQueueConnector(ctx, key=key) if connector == "tensor" else SharedMemoryConnector(ctx, key=key)
    out_q, ready = ctx.Queue(), ctx.Barrier(2)
    reqs = ([warmup.validate()] if warmup is not None else []) + [req]
    if warmup is not None and warmup.request_id == req.request_id:
        reqs[0] = dataclasses.replace(warmup, request_id=f"{warmup.request_id}-warmup")
    env = stage_env or {}
    unknown = set(env) - {"stage0", "stage1"}
    if unknown:
        raise ValueError(f"stage_env keys must be 'stage0'/'stage1', got {sorted(unknown)}")
    faults = dict(_faults or {})
    procs = {"stage0": ctx.Process(target=_stage0_worker,
                                   args=(spec0, reqs, conn, out_q, ready, timeout, env.get("stage0"), os.getpid(),
                                         faults.get("stage0")), name="bagel-stage0"),
             "stage1": ctx.Process(target=_stage1_worker,
                                   args=(spec, layout1, conn, out_q, timeout, ready, [r.request_id for r in reqs],
                                         env.get("stage1"), stage1_stream_priority, os.getpid(), faults.get("stage1")),
                                   name="bagel-stage1")}
    t0 = time.monotonic()
    for p in procs.values():
        p.start()
    results: dict = {}
    failed: dict[str, str] = {}

    def fail(name: str, why: str) -> None:
        failed[name] = why
        ready.abort()  # a peer waiting at the start barrier wakes now, not at its timeout
        if name == "stage0":
            # Stage 1 keeps whatever KV already reached it (the channel is first in, first out): it finishes that
            # image, or reads this abort and stops at once.
            abort(conn)
        else:
            procs["stage0"].kill()  # without stage 1 there is no image to finish

    try:
        while "stage1" not in results and "stage1" not in failed:
            try:
                name, r = out_q.get(timeout=0.2)
                results[name] = r
                if "error" in r:
                    fail(name, r["error"])
            except queue.Empty:
                for name, p in procs.items():
                    if name not in results and name not in failed and not p.is_alive():
                        fail(name, f"process died (exit code {p.exitcode}) before reporting")
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError(f"split pipeline: no result within {timeout:.0f} s; have {sorted(results)}")
        if "stage1" in failed:
            why = failed["stage1"]
            if "stage0" in failed:
                why = f"{why}; stage 0 failed first: {failed['stage0']}"
            raise RuntimeError(f"split pipeline stage1 failed: {why}")
        if "stage0" not in failed:  # stage 0 finishes its decode (text) after the image; a bounded wait for it
            deadline = time.monotonic() + timeout
            while "stage0" not in results:
                try:
                    name, r = out_q.get(timeout=0.2)
                    results[name] = r
                except queue.Empty:
                    if not procs["stage0"].is_alive():
                        failed["stage0"] = f"process died (exit code {procs['stage0'].exitcode}) before reporting"
                        break
                    if time.monotonic() > deadline:
                        failed["stage0"] = f"no result within {timeout:.0f} s"
                        break
        if "stage0" in failed:  # the image is kept; stage 0's text (if any) is lost, and said so
            results["stage0"] = {"error": failed["stage0"], "text": "", "text_ids": [],
                                 "events": results.get("stage0", {}).get("events", [])}
    finally:
        for p in procs.values():
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        if hasattr(conn, "cleanup"):
            conn.cleanup()  # segments sent but never received (a stage died): unlinked, not leaked
        out_q.close()
        out_q.join_thread()
    results["wall_s"] = time.monotonic() - t0
    return results
