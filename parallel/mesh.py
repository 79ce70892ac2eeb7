"""Process-group mesh cfg x ring x ulysses, with clear errors for degrees the world or the model cannot honour.

Global rank = ((cfg_idx * ring) + ring_idx) * ulysses + uly_idx. Within one CFG group, the sequence-parallel rank
(= token chunk index) is ring_idx * ulysses + uly_idx, so a Ulysses group holds one contiguous super-chunk.
Ranks at or beyond cfg*ring*ulysses are idle (e.g. CFG 3 on 4 GPUs).
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# The guarded-collective helpers live one layer down (bagel_model's KV connectors use them too); re-exported here.
from bagel_model.runtime.collectives import (DEFAULT_TIMEOUT_S, CollectiveError, configure, guarded,  # noqa: F401
                                             init_process_group, new_group)


@dataclass(frozen=True)
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    ring_mode: str = "exact"  # "exact": resumable in global order (bitwise); "fast": rotation + LSE merge

    @property
    def size(self) -> int:
        return self.ulysses * self.ring * self.cfg

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    def name(self) -> str:
        parts = [f"ulysses{self.ulysses}"] if self.ulysses > 1 else []
        if self.ring > 1:
            parts.append(f"ring{self.ring}-{self.ring_mode}")
        if self.cfg > 1:
            parts.append(f"cfg{self.cfg}")
        return "x".join(parts) or "single"

    def validate(self, world_size: int, num_heads: int | None = None) -> "ParallelConfig":
        for k in ("ulysses", "ring", "cfg"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):  # 2.0 would fail later as a raw TypeError in range()
                raise ValueError(f"{k} degree must be an integer, got {v!r} ({type(v).__name__})")
            if v < 1:
                raise ValueError(f"{k} degree must be >= 1, got {getattr(self, k)}")
        if self.ring_mode not in ("exact", "fast"):
            raise ValueError(f"ring_mode must be 'exact' or 'fast', got {self.ring_mode!r}")
        if self.size > world_size:
            raise ValueError(f"cfg {self.cfg} x ring {self.ring} x ulysses {self.ulysses} = {self.size} ranks, "
                             f"but the world has only {world_size}")
        if self.cfg > 3:
            raise ValueError(f"cfg degree {self.cfg} exceeds the 3 CFG branches BAGEL has")
        if num_heads is not None and self.ulysses > num_heads:
            raise ValueError(f"ulysses degree {self.ulysses} exceeds the model's {num_heads} query heads: "
                             "every Ulysses rank needs at least one head")
        return self


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     watchdog: bool = True) -> tuple[int, int]:
    """Initialize from torchrun's environment (or a single process); NCCL on CUDA, gloo otherwise. Every group
    (this default one and the mesh's) gets ``timeout_s``; ``watchdog``: heartbeats that let a failed collective name
    the rank that did not arrive (``bagel_model.runtime.collectives``)."""
    if not timeout_s > 0:
        raise ValueError(f"collective timeout must be a positive number of seconds, got {timeout_s!r}")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if watchdog and world > 1 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent hosts the store before any rank starts: heartbeats from before the rendezvous, so a rank
        # that dies or stops during it is named (not a DistStoreError listing keys after the store timeout)
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])

        def client():
            return dist.TCPStore(addr, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))
        # "default_pg": the prefix env:// rendezvous gives the default group's keys in the shared agent store
        init_process_group(backend, dist.PrefixStore("default_pg", client()), rank, world, timeout_s,
                           watchdog_store=client())
        return rank, world
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if watchdog:
        configure(timeout_s)
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Mesh:
    config: ParallelConfig
    rank: int
    world: int
    cfg_idx: int
    ring_idx: int
    uly_idx: int
    sp_group: object
    uly_group: object
    ring_group: object
    cfg_group: object
    sp_ranks: list[int]
    ring_ranks: list[int]
    cfg_ranks: list[int]
    # CFG-parallel only: the mesh a step with a single job runs on (outside the CFG interval a text2img step has one
    # job; rather than every CFG rank computing all of it, the CFG ranks join its sequence split). None otherwise.
    solo: "Mesh | None" = None

    @property
    def active(self) -> bool:
        return self.rank < self.config.size

    @property
    def sp_rank(self) -> int:
        return self.ring_idx * self.config.ulysses + self.uly_idx

    @staticmethod
    def solo_config(c: ParallelConfig, num_heads: int | None = None) -> ParallelConfig | None:
        """The configuration of a single-job step under CFG-parallel ``c``: with no ring, Ulysses across the CFG
        ranks too (ulysses x cfg; global ranks keep their order); with a ring, the ring grows by the CFG degree.
        Every exact configuration reproduces one device bit for bit, so this changes no output. None without
        CFG-parallel, or when the heads cannot be split that far."""
        if c.cfg == 1:
            return None
        if c.ring == 1:
            solo = ParallelConfig(ulysses=c.ulysses * c.cfg)
        else:
            solo = ParallelConfig(ulysses=c.ulysses, ring=c.ring * c.cfg, ring_mode=c.ring_mode)
        return None if num_heads is not None and solo.ulysses > num_heads else solo

    @staticmethod
    def build(config: ParallelConfig, num_heads: int | None = None) -> "Mesh":
        rank, world = dist.get_rank(), dist.get_world_size()
        c = config.validate(world, num_heads)
        U, R, C = c.ulysses, c.ring, c.cfg

        def g(ci, ri, ui):
            return (ci * R + ri) * U + ui

        mine = {}
        # Every rank creates every group, in the same order (a torch.distributed requirement).
        for ci in range(C):
            ranks = [g(ci, ri, ui) for ri in range(R) for ui in range(U)]
            grp = new_group(ranks)
            if rank in ranks:
                mine["sp"], mine["sp_ranks"] = grp, ranks
            for ri in range(R):
                ranks = [g(ci, ri, ui) for ui in range(U)]
                grp = new_group(ranks)
                if rank in ranks:
                    mine["uly"] = grp
            for ui in range(U):
                ranks = [g(ci, ri, ui) for ri in range(R)]
                grp = new_group(ranks)
                if rank in ranks:
                    mine["ring"], mine["ring_ranks"] = grp, ranks
        for ri in range(R):
            for ui in range(U):
                ranks = [g(ci, ri, ui) for ci in range(C)]
                grp = new_group(ranks)
                if rank in ranks:
                    mine["cfg"], mine["cfg_ranks"] = grp, ranks
        sc = Mesh.solo_config(c, num_heads)
        solo = Mesh.build(sc, num_heads) if sc is not None else None  # every rank builds it: new groups
        if rank >= c.size:
            return Mesh(c, rank, world, -1, -1, -1, None, None, None, None, [], [], [], solo)
        ui = rank % U
        ri = (rank // U) % R
        ci = rank // (U * R)
        return Mesh(c, rank, world, ci, ri, ui, mine["sp"], mine["uly"], mine["ring"], mine["cfg"],
                    mine["sp_ranks"], mine["ring_ranks"], mine["cfg_ranks"], solo)
