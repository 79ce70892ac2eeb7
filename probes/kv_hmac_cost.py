"""Question: what does authenticating the KV payload cost on the host? Finding: about 10 ms per side (README).

The payload: HMAC-SHA256 (``bagel_model.serving.payload``) of a BAGEL-7B-MoT text-to-image request at 1024² (28
layers, 4 KV heads, head_dim 128, bf16; the payload does not grow with the image size, only with the context tokens:
a few dozen per branch; 3 contexts x 48 tokens = 7.9 MiB, ~800 MiB/s on one CPU core). Once per request, at send and
at receipt — never per denoise step. Compared with the CRC-32 the byte connectors already compute and with
serialize().

    python -m probes.kv_hmac_cost [--tokens 48] [--contexts 3] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time
import zlib

import torch

from bagel_model.engine.denoise import SamplingParams
from bagel_model.serving.payload import ContextKV, KVPayload, _mac, new_run_key, serialize

LAYERS, KV_HEADS, HEAD_DIM = 28, 4, 128  # BAGEL-7B-MoT (Qwen2-7B LLM)


def payload(tokens: int, contexts: int) -> KVPayload:
    g = torch.Generator().manual_seed(0)
    names = ["full", "text", "img"][:contexts]
    ctxs = {n: ContextKV(tokens, [torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g).bfloat16() for _ in range(LAYERS)],
                         [torch.randn(tokens, KV_HEADS, HEAD_DIM, generator=g).bfloat16() for _ in range(LAYERS)])
            for n in names}
    branches = {b: (b if b in ctxs else "full") for b in ("full", "text", "img")}
    return KVPayload("probe", "text2img", SamplingParams(height=1024, width=1024), (1024, 1024), ctxs, branches)


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="context tokens per branch")
    ap.add_argument("--contexts", type=int, default=3, choices=(1, 2, 3), help="distinct contexts carried")
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    p = payload(a.tokens, a.contexts)
    data = serialize(p)
    key = new_run_key()
    mb = len(data) / 2**20
    hmac_ms = median_ms(lambda: _mac(key, data), a.repeats)
    crc_ms = median_ms(lambda: zlib.crc32(data), a.repeats)
    ser_ms = median_ms(lambda: serialize(p), a.repeats)
    print(f"payload: {a.contexts} contexts x {a.tokens} tokens x {LAYERS} layers x K,V ({KV_HEADS} x {HEAD_DIM} bf16) "
          f"= {len(data)} bytes ({mb:.2f} MiB)")
    print(f"HMAC-SHA256  {hmac_ms:8.3f} ms  ({mb / hmac_ms * 1e3:7.0f} MiB/s)  once at send + once at receipt")
    print(f"CRC-32       {crc_ms:8.3f} ms  ({mb / crc_ms * 1e3:7.0f} MiB/s)  (already paid by serialize/deserialize)")
    print(f"serialize()  {ser_ms:8.3f} ms  (includes its CRC-32)")


if __name__ == "__main__":
    main()
