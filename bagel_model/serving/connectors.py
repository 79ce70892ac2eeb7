"""The connectors that carry a transfer payload (``payload``) between the stages, and the calls that speak to any of
them: ``send_payload``, ``recv_payload`` (checked against the receiving model and request), ``abort``.

``InProcessConnector`` (a queue, threads), ``SharedMemoryConnector`` (POSIX shared memory between processes, a
multiprocessing queue for the notices) and ``TorchDistributedConnector`` (point-to-point send/recv) carry the
serialized bytes; ``TensorQueueConnector`` carries the tensors themselves between processes of one node (CUDA IPC
handles: the KV never leaves the GPU) with the header and per-tensor integer checksums. Every one that crosses a
process boundary authenticates with the run's key (``payload.new_run_key``).
"""
from __future__ import annotations

import multiprocessing
import queue
import time
import zlib
from multiprocessing import shared_memory

import torch
import torch.multiprocessing

from .payload import (KVPayload, PayloadError, _canonical, _check_header, _check_mac, _layout_of, _mac, _pack, _run_key,
                      _tensor_sums, _unpack, deserialize, serialize, validate_payload)


def send_payload(connector, payload: KVPayload) -> None:
    """Send through a tensor connector as is, through a byte connector serialized."""
    if hasattr(connector, "send_payload"):
        connector.send_payload(payload)
    else:
        connector.send(serialize(payload))


def recv_payload(connector, timeout: float = 600.0, device: torch.device | str | None = None, model=None,
                 request_id: str | None = None) -> KVPayload:
    """Receive a payload, checked (``validate_payload``) against ``model`` and the expected ``request_id`` when
    given. ``device``: where a tensor connector puts its copies (the receiver's GPU when stage 0 runs on another
    one: one peer copy, no host round trip); byte connectors give CPU tensors either way."""
    if hasattr(connector, "recv_payload"):
        p = connector.recv_payload(timeout=timeout, device=device)
    else:
        p = deserialize(connector.recv(timeout=timeout))
    return validate_payload(p, model, request_id) if model is not None or request_id is not None else p


def abort(connector) -> None:
    """Wake a waiting stage 1 with an error (stage 0 failed before sending) instead of letting it time out."""
    if hasattr(connector, "abort"):
        connector.abort()
    else:
        connector.send(b"")


# ---- connectors ------------------------------------------------------------------------------------------------
class InProcessConnector:
    """Threads of one process: a queue of serialized payloads."""

    def __init__(self):
        self._q: queue.Queue = queue.Queue()

    def send(self, data: bytes) -> None:
        self._q.put(data)

    def recv(self, timeout: float = 600.0) -> bytes:
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stage 1: no KV payload from stage 0 within {timeout:.0f} s (in-process connector)") from None


class SharedMemoryConnector:
    """Two processes: the payload bytes go into a named shared-memory segment; a pipe carries (name, size).

    A pipe, not a multiprocessing queue: ``send`` returns only once the notice is in the kernel's pipe buffer, so a
    sender killed right after sending (stage 0 during its decode) has still delivered its KV. The segment outlives
    the sender; the receiver unlinks it, and ``cleanup`` unlinks any that were never received."""

    def __init__(self, ctx=None, key: bytes | None = None):
        self._rx, self._tx = (ctx or multiprocessing.get_context("spawn")).Pipe(duplex=False)
        self._key = _run_key(key)  # travels to the stages inside this object, over spawn's pipe

    def send(self, data: bytes) -> None:
        tag = _mac(self._key, data)  # the bytes are on the host already: one pass, no copy
        shm = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
        shm.buf[:len(data)] = data
        self._tx.send((shm.name, len(data), tag))  # the tag goes through the private pipe, not the segment
        shm.close()  # the receiver unlinks it

    def abort(self) -> None:
        self._tx.send(None)

    def _get(self, timeout: float):
        if not self._rx.poll(timeout):
            raise TimeoutError(f"stage 1: no KV payload from stage 0 within {timeout:.0f} s (shared-memory connector)")
        try:
            return self._rx.recv()
        except EOFError:
            raise PayloadError("stage 0 closed the shared-memory connector without sending its KV payload") from None

    def recv(self, timeout: float = 600.0) -> bytes:
        msg = self._get(timeout)
        if msg is None:
            raise PayloadError("stage 0 aborted before sending its KV payload")
        if not (isinstance(msg, tuple) and len(msg) == 3):
            raise PayloadError(f"shared-memory connector notice is malformed ({type(msg).__name__})")
        name, size, tag = msg
        try:
            shm = shared_memory.SharedMemory(name=name)
        except FileNotFoundError:
            raise PayloadError(f"the shared-memory segment {name!r} holding the KV payload ({size} bytes) is gone: "
                               "it was unlinked before stage 1 read it (another process, a cleanup of /dev/shm, "
                               "or a second receiver)") from None
        try:
            data = bytes(shm.buf[:size])
        finally:
            shm.close()
            shm.unlink()
        _check_mac(tag, _mac(self._key, data), "shared-memory connector")
        return data

    def cleanup(self) -> None:
        """Unlink every segment still announced in the pipe (its receiver died or was never asked)."""
        while self._rx.poll(0):
            try:
                msg = self._rx.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                continue
            try:
                shm = shared_memory.SharedMemory(name=msg[0])
                shm.close()
                shm.unlink()
            except FileNotFoundError:
                pass


class TorchDistributedConnector:
    """Point-to-point between ranks of an initialized process group (gloo: CPU tensors; NCCL: ``device``)."""

    def __init__(self, peer: int, device: torch.device | str = "cpu", *, key: bytes):
        # ``key``: the run's key, given by whoever started both ranks over a private channel (never the store,
        # which any local process can reach)
        self.peer, self.device = peer, torch.device(device)
        self._key = _run_key(key)

    def send(self, data: bytes) -> None:
        import torch.distributed as dist

        from ..runtime.collectives import guarded

        # the tag rides after the bytes, computed here where they are still on the host
        buf = torch.frombuffer(bytearray(data) + _mac(self._key, data), dtype=torch.uint8).to(self.device)
        guarded("KV payload size send", dist.send, torch.tensor([buf.numel()], dtype=torch.int64, device=self.device), self.peer)
        guarded("KV payload send", dist.send, buf, self.peer)

    def recv(self, timeout: float | None = None) -> bytes:
        import torch.distributed as dist

        from ..runtime.collectives import guarded

        n = torch.zeros(1, dtype=torch.int64, device=self.device)
        guarded("KV payload size recv", dist.recv, n, self.peer)
        buf = torch.empty(int(n.item()), dtype=torch.uint8, device=self.device)
        guarded("KV payload recv", dist.recv, buf, self.peer)
        raw = buf.cpu().numpy().tobytes()
        if len(raw) < 32:
            raise PayloadError(f"KV payload from the torch.distributed connector is {len(raw)} bytes: no HMAC")
        data = raw[:-32]
        _check_mac(raw[-32:], _mac(self._key, data), "torch.distributed connector")
        return data


class TensorQueueConnector:
    """Processes of one node: (header, tensors) through a torch.multiprocessing queue. CUDA tensors cross as IPC
    handles (same GPU or a peer GPU: no host copy, no serialization), CPU tensors as shared memory. The receiver
    clones what it gets and acks, so the sender frees its copy; the sender waits for the acks before it exits
    (an IPC handle dies with its producer). Integrity: the header's per-tensor position-weighted sums and the
    tensors' dtypes and shapes, recomputed on arrival, and a CRC-32 of the header itself.
    """

    def __init__(self, ctx=None, key: bytes | None = None):
        ctx = ctx or torch.multiprocessing.get_context("spawn")
        self._q, self._acks = ctx.Queue(), ctx.Queue()
        self._key = _run_key(key)  # travels to the stages inside this object, over spawn's pipe
        self._held: dict[str, dict[str, torch.Tensor]] = {}

    def send_payload(self, p: KVPayload) -> None:
        self._collect_acks(block=False)
        header, tensors = _pack(p, to_cpu=False)
        header["sums"] = _tensor_sums(tensors)
        header["tensors"] = _layout_of(tensors)
        header["checksum"] = f"{zlib.crc32(_canonical(header)):08x}"
        self._held[p.request_id] = tensors
        self._q.put((header, tensors, self._tag(header, tensors)))

    def recv_payload(self, timeout: float = 600.0, device: torch.device | str | None = None) -> KVPayload:
        try:
            msg = self._q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"stage 1: no KV payload from stage 0 within {timeout:.0f} s (tensor connector)") from None
        if msg is None:
            raise PayloadError("stage 0 aborted before sending its KV payload")
        if not (isinstance(msg, tuple) and len(msg) in (2, 3) and isinstance(msg[1], dict)):
            raise PayloadError(f"KV payload message is malformed ({type(msg).__name__})")
        meta, received = msg[:2]
        _check_header(meta)
        if not isinstance(meta.get("sums"), dict) or f"{zlib.crc32(_canonical(meta)):08x}" != meta["checksum"]:
            raise PayloadError("KV payload header checksum mismatch: its header was altered in transit")
        expected_tag = self._tag(meta, received)  # before the copies: CPU tensors are hashed where they are
        tag = msg[2] if len(msg) == 3 else None
        # own copies (the sender may free its own now), on the receiver's device if it named one
        tensors = {n: t.to(device or t.device, copy=True) for n, t in received.items()}
        sums = _tensor_sums(tensors)  # synchronizes: the (peer) copies are complete before the ack
        del msg, received  # drop every reference to the producer's IPC tensors before acknowledging
        self._acks.put(meta["request_id"])
        if _layout_of(tensors) != meta.get("tensors") or sums != meta["sums"]:
            raise PayloadError("KV payload checksum mismatch: tensors were altered in transit (or do not match the "
                               "header's names, dtypes and shapes)")
        _check_mac(tag, expected_tag, "tensor connector")
        return _unpack(meta, tensors)

    def _tag(self, header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
        """HMAC of the header (names, dtypes, shapes and sums of every tensor) and of the CPU tensors' bytes. CUDA
        tensors' bytes are left to the header's sums: hashing them would copy the KV to the host (a device sync)."""
        parts = [_canonical(header)]
        for name in sorted(tensors):
            t = tensors[name]
            if t.device.type == "cpu" and t.numel():
                parts.append(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        return _mac(self._key, *parts)

    def abort(self) -> None:
        self._q.put(None)

    def _collect_acks(self, block: bool, timeout: float = 0.0) -> None:
        deadline = time.monotonic() + timeout
        while self._held:
            try:
                rid = self._acks.get(timeout=max(0.0, deadline - time.monotonic())) if block else self._acks.get_nowait()
            except queue.Empty:
                if block:
                    raise TimeoutError(f"stage 0: stage 1 did not acknowledge KV payloads {sorted(self._held)} "
                                       f"within {timeout:.0f} s") from None
                return
            self._held.pop(rid, None)

    def close(self, timeout: float = 600.0) -> None:
        """Sender side: wait until every sent payload was received (its tensors may be freed only then)."""
        self._collect_acks(block=True, timeout=timeout)
