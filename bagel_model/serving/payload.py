"""The transfer payload of stage 0 -> stage 1: a request's prefill KV and metadata, its serialization, integrity
and authentication, and its checks against the receiving model (the connectors that carry it: ``connectors``).

Payload = the per-layer K/V of every CFG context of one request, read out of the sender's paged cache (whatever its
layout) as contiguous (length, H_kv, D) tensors, plus metadata: request id, mode, image shape, every sampling
parameter, each context's length and next RoPE position, and custom fields. The receiver writes the K/V into a
paged cache of ITS layout. Serialized with safetensors (tensors + a JSON header in its metadata).

Integrity: one checksum covers the whole payload — every header field (request id, mode, sampling parameters,
image shape, each context's length / RoPE position / layer count, the branch map, custom fields) and every tensor's
name, dtype, shape and bytes in order (CRC-32 over the bytes on the byte connectors; on the tensor connector, which
never copies the KV to the host, a position-weighted integer sum per tensor computed on its device, so permuted
rows change it). ``validate_payload`` then checks the payload against the receiving model (layers, KV heads,
head_dim, dtype, the branches of its mode, image size) and the request it answers (request id). Anything wrong is a
``PayloadError`` naming it — never an image. This is protection against corruption and mix-ups in transit, not
against a deliberate forger (CRC-32 is not a MAC).

Authentication: every connector that crosses a process boundary takes the run's random ``key`` (``new_run_key``:
made by the parent, handed to its stages inside the connector over spawn's private pipe — never on a command line,
never in the payload) and sends an HMAC-SHA256 tag with each payload; the receiver refuses a payload whose tag does
not match (a header rewritten with its CRC recomputed, another request's tensors spliced in). The tag covers the
serialized bytes (header + tensors) on the byte connectors, where they are on the host anyway; on the tensor
connector it covers the header (with every tensor's name, dtype, shape and position-weighted sum) and the bytes of
CPU tensors — CUDA tensors' bytes are not hashed (that would copy the KV to the host and add a device sync), so
there they are covered by the header's non-cryptographic sums only.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import zlib
from dataclasses import dataclass, field

import torch
import torch.multiprocessing
from safetensors.torch import load, save

from ..core.sampling import SamplingParams
from ..engine.kv_cache import Context, new_cache

MAGIC, VERSION = "bagel-kv", 2  # 2: the checksum covers the header too


class PayloadError(ValueError):
    pass


def new_run_key() -> bytes:
    """A random HMAC key for one run's stages (256 bits, from the OS's CSPRNG)."""
    return secrets.token_bytes(32)


def _run_key(key: bytes | None) -> bytes:
    if key is None:  # the connector is made by the parent: a fresh key here is still the parent's
        return new_run_key()
    if not isinstance(key, bytes) or len(key) < 16:
        raise ValueError(f"a connector key must be at least 16 random bytes (new_run_key()), got "
                         f"{type(key).__name__} of length {len(key) if hasattr(key, '__len__') else '?'}")
    return key


def _mac(key: bytes, *parts) -> bytes:
    """HMAC-SHA256 over ``parts`` (bytes-like; zero-copy buffers of host tensors)."""
    m = hmac.new(key, digestmod=hashlib.sha256)
    for part in parts:
        m.update(part)
    return m.digest()


def _check_mac(tag, expected: bytes, where: str) -> None:
    if not isinstance(tag, bytes):
        raise PayloadError(f"KV payload from the {where} carries no HMAC: not sent by this run's stage 0")
    if not hmac.compare_digest(tag, expected):
        raise PayloadError(f"KV payload from the {where} is not authentic: its HMAC-SHA256 does not match this run's "
                           "key (its header or tensors were rewritten after stage 0 sent it, or another process sent "
                           "it)")


@dataclass
class ContextKV:
    rope_position: int
    k: list[torch.Tensor]  # per layer (length, H_kv, D)
    v: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.k[0].shape[0] if self.k else 0


@dataclass
class KVPayload:
    request_id: str
    mode: str
    params: SamplingParams
    image_shape: tuple[int, int]
    contexts: dict[str, ContextKV]  # unique contexts by name
    branches: dict[str, str]  # CFG branch -> context name ("img" may share "full")
    extra: dict = field(default_factory=dict)  # custom metadata, carried as is (JSON)


def extract(ctx: Context) -> ContextKV:
    """Read a prefilled paged cache out as contiguous per-layer K/V (layout-independent)."""
    ks, vs = zip(*(ctx.cache.read(i) for i in range(ctx.cache.num_layers))) if ctx.cache.length else ((), ())
    return ContextKV(ctx.rope_position, [k.contiguous() for k in ks], [v.contiguous() for v in vs])


def install(model, ckv: ContextKV, layout: str) -> Context:
    """Write a received context into a new paged cache of ``layout`` on the model's device."""
    cache = new_cache(model, max(ckv.length, 1), layout)
    if ckv.length:
        for i, (k, v) in enumerate(zip(ckv.k, ckv.v)):
            cache.write(i, k.to(model.device), v.to(model.device))
        cache.commit(ckv.length)
    return Context(cache, ckv.rope_position)


def _canonical(header: dict) -> bytes:
    """The header's bytes for the checksum: JSON with sorted keys, the checksum itself left out."""
    return json.dumps({k: v for k, v in header.items() if k != "checksum"}, sort_keys=True,
                      separators=(",", ":")).encode()


def _digest(header: dict, tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 over the header and every tensor's name, dtype, shape and bytes, in name order (order-sensitive
    within each tensor). A transit-integrity check (corruption, mix-ups); CRC-32 is much cheaper than a cryptographic
    hash, and an img2img payload is gigabytes (authenticity is the HMAC's job, not this one's)."""
    crc = zlib.crc32(_canonical(header))
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        crc = zlib.crc32(f"{name}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        if t.numel():
            crc = zlib.crc32(t.view(torch.uint8).numpy(), crc)  # the array's buffer: no copy
    return f"{crc:08x}"


def _pack(p: KVPayload, to_cpu: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """(header, tensors) of a payload; tensors stay on their device unless ``to_cpu``. The header is made
    JSON-plain (tuples become lists) so that the sender's and the receiver's checksums see the same bytes."""
    tensors = {}
    ctx_meta = {}
    for name, c in p.contexts.items():
        ctx_meta[name] = {"rope_position": c.rope_position, "length": c.length, "layers": len(c.k)}
        for i, (k, v) in enumerate(zip(c.k, c.v)):
            tensors[f"{name}.{i}.k"] = (k.detach().cpu() if to_cpu else k.detach()).contiguous()
            tensors[f"{name}.{i}.v"] = (v.detach().cpu() if to_cpu else v.detach()).contiguous()
    header = {"magic": MAGIC, "version": VERSION, "request_id": p.request_id, "mode": p.mode,
              "params": p.params.to_dict(), "image_shape": list(p.image_shape), "contexts": ctx_meta,
              "branches": p.branches, "extra": p.extra}
    return json.loads(json.dumps(header)), tensors


def serialize(p: KVPayload) -> bytes:
    header, tensors = _pack(p, to_cpu=True)
    header["checksum"] = _digest(header, tensors)
    return save(tensors, metadata={"bagel": json.dumps(header)})


def deserialize(data: bytes) -> KVPayload:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"KV payload must be bytes (serialize()'s output), got {type(data).__name__}")
    if len(data) < 8:
        raise PayloadError(f"KV payload too short ({len(data) if hasattr(data, '__len__') else '?'} bytes)")
    try:
        hlen = int.from_bytes(data[:8], "little")
        header_json = json.loads(bytes(data[8:8 + hlen]).decode("utf-8"))
        meta = json.loads(header_json.get("__metadata__", {}).get("bagel", "null"))
        tensors = load(bytes(data))
    except PayloadError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed payload
        raise PayloadError(f"KV payload is malformed or truncated ({len(data)} bytes): {type(e).__name__}: {e}") from e
    _check_header(meta)
    if _digest(meta, tensors) != meta["checksum"]:
        raise PayloadError("KV payload checksum mismatch: its header or tensor bytes were altered in transit (or it "
                           "is not the payload its header describes)")
    return _unpack(meta, tensors)


def _check_header(meta) -> None:
    if not isinstance(meta, dict) or meta.get("magic") != MAGIC:
        raise PayloadError("KV payload lacks the bagel-kv header (not a payload of this protocol)")
    if meta.get("version") != VERSION:
        raise PayloadError(f"KV payload version {meta.get('version')} != supported {VERSION}")
    missing = [k for k in ("request_id", "mode", "params", "image_shape", "contexts", "branches", "extra",
                           "checksum") if k not in meta]
    if missing:
        raise PayloadError(f"KV payload header misses {missing}")


def _unpack(meta: dict, tensors: dict[str, torch.Tensor]) -> KVPayload:
    """A payload from a checked header and its tensors: every tensor present with the header's token count."""
    try:
        params = SamplingParams.from_dict(meta["params"])
    except (TypeError, ValueError) as e:
        raise PayloadError(f"KV payload request parameters are invalid: {e}") from e
    contexts = {}
    for name, cm in meta["contexts"].items():
        ks, vs = [], []
        for i in range(cm["layers"]):
            for kind, lst in (("k", ks), ("v", vs)):
                key = f"{name}.{i}.{kind}"
                if key not in tensors:
                    raise PayloadError(f"KV payload misses tensor {key!r}")
                if tensors[key].shape[0] != cm["length"]:
                    raise PayloadError(f"KV payload tensor {key!r} has {tensors[key].shape[0]} tokens, header says {cm['length']}")
                lst.append(tensors[key])
        contexts[name] = ContextKV(cm["rope_position"], ks, vs)
    for b, c in meta["branches"].items():
        if c not in contexts:
            raise PayloadError(f"KV payload branch {b!r} refers to unknown context {c!r}")
    return KVPayload(meta["request_id"], meta["mode"], params, tuple(meta["image_shape"]), contexts,
                     dict(meta["branches"]), meta["extra"])


def _tensor_sums(tensors: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Per tensor, two integer sums of its bits on its device: plain, and weighted by position (Fletcher-style:
    sum of (i + 1) * bits_i, wrapping mod 2**64, which is exact and associative, so any reduction order gives the
    same value on any device). The weighted one changes when rows or values are permuted. One synchronization."""
    names = sorted(tensors)
    if not names:
        return {}
    sums = []
    for n in names:
        t = tensors[n].reshape(-1)
        bits = t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).long()
        pos = torch.arange(1, bits.numel() + 1, dtype=torch.int64, device=t.device)
        sums.append(torch.stack([bits.sum(), (bits * pos).sum()]) if bits.numel()
                    else torch.zeros(2, dtype=torch.int64, device=t.device))
    values = torch.stack([x.to(sums[0].device) for x in sums]).tolist()
    return {n: v for n, v in zip(names, values)}


def _layout_of(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Each tensor's dtype and shape, for the tensor connector's header checksum."""
    return {n: [str(t.dtype), list(t.shape)] for n, t in sorted(tensors.items())}


def validate_payload(p: KVPayload, model=None, request_id: str | None = None) -> KVPayload:
    """A received payload fits the model that will use it and answers the request it is expected to answer:
    a ``PayloadError`` naming the mismatch otherwise."""
    if request_id is not None and p.request_id != request_id:
        raise PayloadError(f"KV payload answers request {p.request_id!r}, expected {request_id!r}")
    if p.mode not in ("text2img", "img2img"):
        raise PayloadError(f"KV payload mode {p.mode!r} is not an image mode (text2img, img2img)")
    check_branch_map(p)
    _check_finite(p)
    for name, c in p.contexts.items():
        if not 0 <= c.rope_position <= max(c.length, 0) or (c.length == 0 and c.rope_position != 0):
            raise PayloadError(f"KV payload context {name!r}: RoPE position {c.rope_position} is impossible for "
                               f"{c.length} tokens")
    if model is None:
        return p
    cfg = model.cfg
    try:
        cfg.check_image_size(*p.image_shape)
    except ValueError as e:
        raise PayloadError(f"KV payload image shape {tuple(p.image_shape)} does not fit the model: {e}") from None
    want_shape = (cfg.num_kv_heads, cfg.head_dim)
    want_dtype = next(model.parameters()).dtype
    for name, c in p.contexts.items():
        if c.length and (len(c.k) != cfg.num_layers or len(c.v) != len(c.k)):
            raise PayloadError(f"KV payload context {name!r} has {len(c.k)} layers; the model has {cfg.num_layers}"
                               + (f" (and {len(c.v)} V layers)" if len(c.v) != len(c.k) else ""))
        for i, t in enumerate(list(c.k) + list(c.v)):  # every layer's: shapes are host metadata
            if tuple(t.shape[1:]) != want_shape or t.shape[0] != c.length:
                which = f"layer {i % max(len(c.k), 1)} {'kv'[i // max(len(c.k), 1)].upper()}"
                raise PayloadError(f"KV payload context {name!r} {which}: shape {tuple(t.shape)}, i.e. KV heads x "
                                   f"head_dim {tuple(t.shape[1:])} != the model's {want_shape} (or not "
                                   f"{c.length} tokens)")
            if t.dtype != want_dtype:
                raise PayloadError(f"KV payload context {name!r}: dtype {t.dtype} != the model's {want_dtype}")
    return p


def check_branch_map(p: KVPayload) -> None:
    """Every CFG branch is mapped, and to a context the payload carries (what stage 1 needs to install it)."""
    from ..engine.denoise import BRANCHES

    if set(p.branches) != set(BRANCHES):
        raise PayloadError(f"KV payload branches {sorted(p.branches)} != the CFG branches {sorted(BRANCHES)}")
    lost = {b: n for b, n in p.branches.items() if n not in p.contexts}
    if lost:
        raise PayloadError(f"KV payload of request {p.request_id!r} lacks contexts {sorted(set(lost.values()))}: "
                           f"branches {lost} name contexts it does not carry (it has {sorted(p.contexts)})")


def _check_finite(p: KVPayload) -> None:
    """No NaN/Inf in the K/V: stage 1 would turn it into a non-finite latent and blame its own step. One reduction
    and one host read per payload, at receipt — never in the denoise loop."""
    named = [(f"{n} layer {i} {kind}", t) for n, c in p.contexts.items()
             for kind, ts in (("K", c.k), ("V", c.v)) for i, t in enumerate(ts) if t.is_floating_point() and t.numel()]
    if not named:
        return
    ok = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    bad = [w for (w, _), good in zip(named, ok) if not good]
    if bad:
        raise PayloadError(f"KV payload of request {p.request_id!r} holds non-finite (NaN/Inf) K/V in {len(bad)} "
                           f"tensor(s): {', '.join(bad[:6])}{' ...' if len(bad) > 6 else ''} — stage 0's prefill "
                           "produced it or it was damaged in transit")
