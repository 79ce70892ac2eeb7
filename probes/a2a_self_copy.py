"""Question: where does Ulysses 2's q/k/v exchange spend its time -- NCCL's transfer, the part a rank sends itself, or the packing copies? Finding (2 x H200, 2026-11-29, CUDA-graph replay): half is the transfer (0.099 of 0.195 ms per layer), half the copies; the self part and more CTAs change nothing.

Shapes: a 1024² CFG step, 4224 rows per rank, 28/4 heads of 128, 18.6 MiB per destination. ms per layer:
``parallel.ulysses.scatter_heads`` as it is 0.195; the all_to_all alone 0.099 (peers only 0.105; min_ctas 16 or 32:
0.099); packing by one strided copy per tensor instead of contiguous()+cat 0.145 with the exchange; q in its own
exchange (no unpacking) + k/v together 0.175. The copies that remain need the producing and consuming kernels to
read and write the exchange's layout (not done). Every variant receives the same q, k, v.

    torchrun --nproc-per-node 2 -m probes.a2a_self_copy       (two GPUs, NCCL)
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

ROWS, HQ, HKV, D = 4224, 28, 4, 128


def timed_ms(fn, iters: int = 50, graph: bool = True) -> float:
    """Mean ms per call: replayed from a CUDA graph of ``iters`` calls (GPU time, as the step runs them), or eager
    (host launch time included)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(5):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(iters):
                fn()
        run = g.replay
    torch.cuda.synchronize()
    dist.barrier()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    if graph:
        run()
    else:
        for _ in range(iters):
            run()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    dev, dt = torch.device("cuda", rank), torch.bfloat16
    q = torch.randn(ROWS, HQ, D, device=dev, dtype=dt)
    k, v = (torch.randn(ROWS, HKV, D, device=dev, dtype=dt) for _ in range(2))
    hq, hk = HQ // world, HKV // world
    parts = lambda dst: [q[:, dst * hq:(dst + 1) * hq], k[:, dst * hk:(dst + 1) * hk], v[:, dst * hk:(dst + 1) * hk]]  # noqa: E731
    per = ROWS * (hq + 2 * hk) * D
    recv = torch.empty(world * per, device=dev, dtype=dt)

    def with_self():  # today: every destination's part packed, one all_to_all_single including the self part
        send = torch.cat([p.reshape(-1) for dst in range(world) for p in parts(dst)])
        dist.all_to_all_single(recv, send, [per] * world, [per] * world)

    def peer_only():  # self part copied by a plain kernel; NCCL moves only the peers' parts
        splits = [0 if r == rank else per for r in range(world)]
        send = torch.cat([p.reshape(-1) for dst in range(world) if dst != rank for p in parts(dst)])
        out = recv.view(world, per)
        torch.cat([p.reshape(-1) for p in parts(rank)], out=out[rank])
        peer = torch.empty(per * (world - 1), device=dev, dtype=dt)
        dist.all_to_all_single(peer, send, splits, splits)
        return peer

    def nccl_only():  # the collective alone, self part included, no packing
        send = torch.empty(world * per, device=dev, dtype=dt)
        dist.all_to_all_single(recv, send, [per] * world, [per] * world)

    def peer_nopack():
        splits = [0 if r == rank else per for r in range(world)]
        send = torch.empty(per * (world - 1), device=dev, dtype=dt)
        peer = torch.empty(per * (world - 1), device=dev, dtype=dt)
        dist.all_to_all_single(peer, send, splits, splits)

    qn, kn = ROWS * hq * D, ROWS * hk * D
    send2 = torch.empty(world, per, device=dev, dtype=dt)

    def pack_views():  # one strided copy per tensor straight into the send buffer's per-destination regions
        send2[:, :qn].view(world, ROWS, hq, D).copy_(q.view(ROWS, world, hq, D).transpose(0, 1))
        send2[:, qn:qn + kn].view(world, ROWS, hk, D).copy_(k.view(ROWS, world, hk, D).transpose(0, 1))
        send2[:, qn + kn:].view(world, ROWS, hk, D).copy_(v.view(ROWS, world, hk, D).transpose(0, 1))
        dist.all_to_all_single(recv, send2.view(-1), [per] * world, [per] * world)

    def today_scatter():  # parallel.ulysses.scatter_heads as it is: pack by cat, exchange, unpack by cat
        with_self()
        got = recv.view(world, per)
        return (torch.cat([got[r, :qn].view(ROWS, hq, D) for r in range(world)]),
                torch.cat([got[r, qn:qn + kn].view(ROWS, hk, D) for r in range(world)]),
                torch.cat([got[r, qn + kn:].view(ROWS, hk, D) for r in range(world)]))

    def views_scatter():  # pack by views, exchange, unpack by one strided copy per tensor
        pack_views()
        got = recv.view(world, per)
        return (got[:, :qn].reshape(world * ROWS, hq, D), got[:, qn:qn + kn].reshape(world * ROWS, hk, D),
                got[:, qn + kn:].reshape(world * ROWS, hk, D))

    sq = torch.empty(world, qn, device=dev, dtype=dt)
    rq = torch.empty(world * qn, device=dev, dtype=dt)
    skv = torch.empty(world, 2 * kn, device=dev, dtype=dt)
    rkv = torch.empty(world * 2 * kn, device=dev, dtype=dt)

    def q_alone_scatter():  # q in its own exchange: its receive buffer is already (world*rows, hq, D)
        sq.view(world, ROWS, hq, D).copy_(q.view(ROWS, world, hq, D).transpose(0, 1))
        dist.all_to_all_single(rq, sq.view(-1))
        skv[:, :kn].view(world, ROWS, hk, D).copy_(k.view(ROWS, world, hk, D).transpose(0, 1))
        skv[:, kn:].view(world, ROWS, hk, D).copy_(v.view(ROWS, world, hk, D).transpose(0, 1))
        dist.all_to_all_single(rkv, skv.view(-1))
        got = rkv.view(world, 2 * kn)
        return (rq.view(world * ROWS, hq, D), got[:, :kn].reshape(world * ROWS, hk, D),
                got[:, kn:].reshape(world * ROWS, hk, D))

    ref = [t.clone() for t in today_scatter()]
    same = all(torch.equal(a, b) for f in (views_scatter, q_alone_scatter) for a, b in zip(ref, f()))
    if rank == 0:
        print("every variant receives the same q, k, v:", same)

    cases = [("scatter_heads today (cat pack, a2a, cat unpack)", today_scatter),
             ("pack by strided views + a2a", pack_views), ("views pack, a2a, strided unpack", views_scatter),
             ("q alone + k/v together, views pack", q_alone_scatter),
             ("pack + all_to_all with self", with_self), ("all_to_all peers only, no packing", peer_nopack), ("pack peers + self copy + all_to_all peers only", peer_only),
             ("all_to_all with self, no packing", nccl_only)]
    for ctas in (16, 32):  # more CTAs (channels) for the collective: NCCL's config, given per group
        try:
            opts = dist.ProcessGroupNCCL.Options()
            opts.config.min_ctas = ctas
            opts.config.max_ctas = max(ctas, 32)
            grp = dist.new_group(list(range(world)), pg_options=opts)
        except Exception as e:  # noqa: BLE001 - this torch may not expose NCCL's config
            if rank == 0:
                print("no NCCL config:", type(e).__name__, e)
            break

        def wide(grp=grp):
            send = torch.empty(world * per, device=dev, dtype=dt)
            dist.all_to_all_single(recv, send, [per] * world, [per] * world, group=grp)

        def wide_peer(grp=grp):
            splits = [0 if r == rank else per for r in range(world)]
            send = torch.empty(per * (world - 1), device=dev, dtype=dt)
            peer = torch.empty(per * (world - 1), device=dev, dtype=dt)
            dist.all_to_all_single(peer, send, splits, splits, group=grp)
        cases += [(f"all_to_all with self, no packing, min_ctas {ctas}", wide),
                  (f"all_to_all peers only, no packing, min_ctas {ctas}", wide_peer)]
    rows = {name: (timed_ms(fn, graph=False), timed_ms(fn)) for name, fn in cases}
    mb = per * 2 / 2**20
    if rank == 0:
        print(f"per destination {mb:.1f} MiB; ms per exchange (mean of 50): eager, CUDA-graph replay")
        for name, (eager, replay) in rows.items():
            print(f"  {name:52s} {eager:7.3f} {replay:7.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
