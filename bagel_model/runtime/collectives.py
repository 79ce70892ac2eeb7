"""Collectives that fail within a bounded time and name the rank that did not arrive.

Lives in ``bagel_model`` (not ``parallel``) because the KV connectors use it too: lower layers never import higher.

Two pieces:
- ``new_group`` gives every process group the configured timeout (``dist.new_group`` without ``timeout=`` keeps
  PyTorch's 1800 s default: a frozen peer then hangs every other rank for 30 minutes).
- A liveness ``Watchdog``: each rank bumps a heartbeat counter in the rendezvous store every ``interval`` seconds
  from a daemon thread (a stopped or killed process stops bumping it). When a ``guarded`` collective fails, the
  error names the ranks whose counters stopped (``missing_ranks``) instead of only this rank's view. As a backstop
  for backends whose collectives block outside Python's reach (NCCL: the wait happens at the next device sync), the
  thread ends this process when a peer has been silent for longer than the timeout, with the same message.
A rank that leaves normally (or through an error it reported) marks itself as gone, so it is not mistaken for a
frozen one.
"""
from __future__ import annotations

import atexit
import datetime
import os
import sys
import threading
import time

import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0  # a stalled peer surfaces within a minute; a collective of this codebase takes << 1 s
_PREFIX = "bagel_hb"


class CollectiveError(RuntimeError):
    pass


class Watchdog:
    """Heartbeats of this rank and a view of everyone else's, through a store all ranks reach."""

    def __init__(self, store, rank: int, world: int, timeout_s: float, interval_s: float = 0.5,
                 exit_on_silent_peer: bool = True):
        self.store, self.rank, self.world = store, rank, world
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.exit_on_silent_peer = exit_on_silent_peer
        self._lock = threading.Lock()  # one store client, two threads
        self._stop = threading.Event()
        self._beats = 0
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (last counter, monotonic time it last changed)
        self.inflight: str | None = None  # the collective this rank is in, for the backstop's message
        self._beat()
        self._thread = threading.Thread(target=self._run, name="bagel-collective-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _key(self, kind: str, rank: int) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    def _beat(self) -> None:
        self._beats += 1
        with self._lock:
            self.store.set(self._key("beat", self.rank), str(self._beats))

    def _read(self) -> tuple[dict[int, int], set[int]]:
        """Every peer's counter (absent: -1) and the peers that left on purpose."""
        counters, gone = {}, set()
        with self._lock:
            for r in range(self.world):
                if r == self.rank:
                    continue
                counters[r] = int(self.store.get(self._key("beat", r))) if self.store.check([self._key("beat", r)]) else -1
                if self.store.check([self._key("gone", r)]):
                    gone.add(r)
        return counters, gone

    def _observe(self) -> set[int]:
        now = time.monotonic()
        counters, gone = self._read()
        for r, c in counters.items():
            last = self._seen.get(r)
            if last is None or last[0] != c:
                self._seen[r] = (c, now)
        return gone

    def silent_for(self) -> dict[int, float]:
        """Seconds since each peer's heartbeat last moved (as seen by this rank's observations)."""
        now = time.monotonic()
        return {r: now - t for r, (_, t) in self._seen.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                gone = self._observe()
            except Exception:  # noqa: BLE001 - the store's host died; guarded() reports that on the next failure
                continue
            if not self.exit_on_silent_peer:
                continue
            # later than a failing guarded collective would report (timeout + its heartbeat window): this only
            # catches waits that no collective timeout ends (NCCL blocks at the next device sync)
            limit = self.timeout_s + 5.0
            silent = sorted(r for r, s in self.silent_for().items() if s > limit and r not in gone)
            if silent:
                where = f"in collective {self.inflight!r}" if self.inflight else "between collectives"
                print(f"rank {self.rank}: rank(s) {silent} stopped responding (no heartbeat for more than "
                      f"{limit:.0f} s) while this rank was {where}; exiting", file=sys.stderr, flush=True)
                os._exit(3)

    def missing_ranks(self, window_s: float | None = None) -> tuple[list[int], list[int]]:
        """(ranks whose heartbeat does not move over ``window_s``, ranks that left on purpose). Waits the window."""
        window_s = window_s if window_s is not None else max(4 * self.interval_s, 1.5)
        first, _ = self._read()
        deadline = time.monotonic() + window_s
        moved: set[int] = set()
        while time.monotonic() < deadline and len(moved) < len(first):
            time.sleep(self.interval_s / 2)
            now, gone = self._read()
            moved |= {r for r, c in now.items() if c != first[r]}
        _, gone = self._read()
        return sorted(r for r in first if r not in moved and r not in gone), sorted(gone)

    def mark_gone(self) -> None:
        try:
            with self._lock:
                self.store.set(self._key("gone", self.rank), "1")
        except Exception:  # noqa: BLE001 - nothing left to tell anyone
            pass

    def close(self) -> None:
        self._stop.set()
        self.mark_gone()


_state: dict = {"timeout_s": DEFAULT_TIMEOUT_S, "watchdog": None}


def configure(timeout_s: float = DEFAULT_TIMEOUT_S, store=None, interval_s: float = 0.5,
              exit_on_silent_peer: bool = True, rank: int | None = None, world: int | None = None) -> None:
    """Set the timeout every group gets and start this rank's watchdog on ``store`` (default: a client of the
    rendezvous store at MASTER_ADDR:MASTER_PORT, torchrun's). Call after ``dist.init_process_group``, or before
    it with ``rank`` and ``world`` (``init_process_group`` below) so that the rendezvous itself is watched."""
    if not timeout_s > 0:  # also rejects NaN
        raise ValueError(f"collective timeout must be a positive number of seconds, got {timeout_s!r}")
    shutdown()
    _state["timeout_s"] = float(timeout_s)
    if store is None:
        store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=datetime.timedelta(seconds=min(timeout_s, 10.0)))
    _state["watchdog"] = Watchdog(store, dist.get_rank() if rank is None else rank,
                                  dist.get_world_size() if world is None else world, timeout_s, interval_s,
                                  exit_on_silent_peer)


def shutdown() -> None:
    """This rank leaves on purpose: peers must not take its silence for a failure."""
    wd = _state.get("watchdog")
    if wd is not None:
        wd.close()
        _state["watchdog"] = None


def timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=_state["timeout_s"])


def new_group(ranks: list[int]):
    """``dist.new_group`` with the configured timeout (never PyTorch's 30-minute default), guarded: a rank that
    died or stopped before creating it is named (creation waits on every rank of the world through the store, and
    otherwise ends in a ``DistStoreError`` listing store keys)."""
    return guarded(f"new_group {ranks}", dist.new_group, ranks, timeout=timeout())


def init_process_group(backend: str, store, rank: int, world: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                       watchdog_store=None, interval_s: float = 0.5, exit_on_silent_peer: bool = True) -> None:
    """``dist.init_process_group`` on ``store`` with this rank's watchdog started first (on ``watchdog_store``, a
    second client of the same store: ``configure``): a rank that dies or stops during the rendezvous is named in
    the ``CollectiveError``, as in any guarded collective, instead of a ``DistStoreError`` after the store timeout."""
    configure(timeout_s, store=watchdog_store, interval_s=interval_s, exit_on_silent_peer=exit_on_silent_peer,
              rank=rank, world=world)
    guarded("process group rendezvous (init_process_group)", dist.init_process_group, backend, store=store, rank=rank,
            world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


def _missing_text() -> str:
    wd = _state.get("watchdog")
    if wd is None:
        return ""
    try:
        missing, gone = wd.missing_ranks()
    except Exception as e:  # noqa: BLE001
        return (f"; the rendezvous store is unreachable ({type(e).__name__}), so its host (rank 0 outside "
                "torchrun) is likely dead")
    parts = []
    if missing:
        parts.append(f"rank(s) {missing} did not arrive (no heartbeat: stopped or dead)")
    if gone:
        parts.append(f"rank(s) {gone} had already left")
    return "; " + "; ".join(parts) if parts else "; every peer is still alive (a mismatched collective?)"


def guarded(what: str, fn, *args, **kwargs):
    """Run a collective; a failure or timeout names this rank, the collective and the rank(s) that did not arrive.
    The error is raised within the group's timeout (plus a heartbeat window of ~2 s to tell who is missing)."""
    wd = _state.get("watchdog")
    if wd is not None:
        wd.inflight = what
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001
        rank = dist.get_rank() if dist.is_initialized() else (wd.rank if wd is not None else -1)
        msg = (f"rank {rank}: collective {what!r} failed after {time.monotonic() - t0:.1f} s{_missing_text()}: "
               f"{type(e).__name__}: {e}")
        if wd is not None:
            wd.mark_gone()  # this rank is about to leave: not a silent peer for the others
        raise CollectiveError(msg) from e
    finally:
        if wd is not None:
            wd.inflight = None
