"""The KV payload between stages is checked whole: any altered header field or tensor row, a payload of another
request, or one that does not fit the receiving model is an error naming what is wrong — never an image."""
import dataclasses
import json

import pytest
import torch

from bagel_model.serving.payload import PayloadError, _pack, deserialize, serialize, validate_payload

from bagel_model.serving.connectors import TensorQueueConnector, recv_payload, send_payload
from bagel_model.serving.stages import Request, run_stage0
from bagel_model.core.sampling import SamplingParams


@pytest.fixture(scope="module")
def payload(tiny_model, tokenizer):
    req = Request("text2img", "a red cube", SamplingParams(steps=3, height=32, width=32), request_id="req-A")
    return run_stage0(tiny_model, tokenizer, req, send=lambda p: None).payload  # a payload is made to be sent


def _resave(data: bytes, edit_meta=None, edit_tensors=None) -> bytes:
    """The payload's tensors and header, edited, saved again with the ORIGINAL checksum (what corruption in
    transit, or a mix-up, would produce)."""
    from safetensors.torch import load, save

    hlen = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + hlen])["__metadata__"]["bagel"])
    tensors = load(data)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    return save(tensors, metadata={"bagel": json.dumps(meta)})


def _set(path, value):
    def edit(meta):
        d = meta
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value
    return edit


HEADER_EDITS = {
    "request_id": (["request_id"], "req-B"),
    "mode": (["mode"], "img2img"),
    "params.seed": (["params", "seed"], 1),
    "params.steps": (["params", "steps"], 4),
    "params.cfg_text_scale": (["params", "cfg_text_scale"], 5.0),
    "image_shape": (["image_shape"], [32, 48]),
    "contexts.rope_position": (["contexts", "full", "rope_position"], 3),
    "contexts.length": (["contexts", "full", "length"], 1),
    "contexts.layers": (["contexts", "full", "layers"], 1),
    "branches": (["branches", "img"], "text"),
    "extra": (["extra"], {"x": 1}),
}


@pytest.mark.parametrize("field", sorted(HEADER_EDITS))
def test_every_header_field_is_covered_by_the_checksum(payload, field):
    path, value = HEADER_EDITS[field]
    bad = _resave(serialize(payload), edit_meta=_set(path, value))
    with pytest.raises(PayloadError, match="checksum mismatch"):
        deserialize(bad)


def test_permuted_rows_and_other_tensors_are_caught(payload):
    good = serialize(payload)
    assert deserialize(good).request_id == "req-A"

    def swap_rows(t):
        k = t["full.0.k"]
        t["full.0.k"] = torch.cat([k[1:2], k[0:1], k[2:]])
    with pytest.raises(PayloadError, match="checksum mismatch"):
        deserialize(_resave(good, edit_tensors=swap_rows))

    def swap_layers(t):
        t["full.0.k"], t["full.1.k"] = t["full.1.k"], t["full.0.k"]
    with pytest.raises(PayloadError, match="checksum mismatch"):
        deserialize(_resave(good, edit_tensors=swap_layers))


def test_another_requests_payload_is_refused(payload, tiny_model):
    got = deserialize(serialize(payload))
    validate_payload(got, tiny_model, "req-A")
    with pytest.raises(PayloadError, match="answers request 'req-A', expected 'req-B'"):
        validate_payload(got, tiny_model, "req-B")


@pytest.mark.parametrize("change,msg", [
    ("one layer", "has 1 layers; the model has 2"),
    ("heads", "KV heads x head_dim (1, 16) != the model's (2, 16)"),
    ("dtype", "dtype torch.float64 != the model's torch.float32"),
    ("branches", "branches ['full', 'img'] != the CFG branches"),
    ("size", "image shape (40, 40) does not fit the model"),
])
def test_a_well_formed_payload_that_does_not_fit_the_model_is_refused(payload, tiny_model, change, msg):
    full = payload.contexts["full"]
    ctxs = dict(payload.contexts)
    p = payload
    if change == "one layer":
        ctxs["full"] = dataclasses.replace(full, k=full.k[:1], v=full.v[:1])
    elif change == "heads":
        ctxs["full"] = dataclasses.replace(full, k=[k[:, :1] for k in full.k], v=[v[:, :1] for v in full.v])
    elif change == "dtype":
        ctxs["full"] = dataclasses.replace(full, k=[k.double() for k in full.k], v=[v.double() for v in full.v])
    elif change == "branches":
        p = dataclasses.replace(p, branches={"full": "full", "img": "full"})
    else:
        p = dataclasses.replace(p, image_shape=(40, 40))
    p = dataclasses.replace(p, contexts=ctxs)
    received = deserialize(serialize(p))  # a valid checksum: the sender meant it; the receiver must still refuse
    with pytest.raises(PayloadError) as e:
        validate_payload(received, tiny_model, "req-A")
    assert msg in str(e.value), str(e.value)


def test_tensor_connector_checks_header_and_row_order(payload, tiny_model):
    conn = TensorQueueConnector()
    send_payload(conn, payload)
    got = recv_payload(conn, timeout=30, model=tiny_model, request_id="req-A")
    assert torch.equal(got.contexts["full"].k[0], payload.contexts["full"].k[0])

    def sent(edit):
        header, tensors = _pack(payload, to_cpu=False)
        from bagel_model.serving.payload import _canonical, _layout_of, _tensor_sums
        import zlib

        header["sums"], header["tensors"] = _tensor_sums(tensors), _layout_of(tensors)
        header["checksum"] = f"{zlib.crc32(_canonical(header)):08x}"
        edit(header, tensors)
        conn._q.put((header, tensors))

    sent(lambda h, t: h["params"].__setitem__("seed", 7))  # a header field
    with pytest.raises(PayloadError, match="header checksum mismatch"):
        recv_payload(conn, timeout=30)

    def permute(h, t):  # same values, other order: an integer sum cannot see it, the weighted one does
        k = t["full.0.k"]
        t["full.0.k"] = torch.cat([k[1:2], k[0:1], k[2:]])
    sent(permute)
    with pytest.raises(PayloadError, match="tensors were altered"):
        recv_payload(conn, timeout=30)


# ---- issue 29: authenticated, not just checksummed ------------------------------------------------------------
def _forge(data: bytes, edit_meta=None, edit_tensors=None) -> bytes:
    """``_resave`` with the CRC recomputed: what a forger (or a buggy process) writing the channel would send.
    ``deserialize`` cannot tell it from the real thing — only the run's HMAC key can."""
    from safetensors.torch import load, save

    from bagel_model.serving.payload import _digest

    hlen = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + hlen])["__metadata__"]["bagel"])
    tensors = load(data)
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    meta["checksum"] = _digest(meta, tensors)
    return save(tensors, metadata={"bagel": json.dumps(meta)})


@pytest.fixture(scope="module")
def other_payload(tiny_model, tokenizer):
    """Another request with as many prompt tokens (byte tokenizer): its tensors fit the first one's header."""
    req = Request("text2img", "a big cube", SamplingParams(steps=3, height=32, width=32), request_id="req-Z")
    return run_stage0(tiny_model, tokenizer, req, send=lambda p: None).payload  # a payload is made to be sent


def _swap_branches(meta):
    meta["branches"]["full"], meta["branches"]["text"] = meta["branches"]["text"], meta["branches"]["full"]


FORGERIES = {  # each keeps the byte size (a segment is rewritten in place) and passes the CRC
    "steps": dict(edit_meta=_set(["params", "steps"], 4)),
    "seed": dict(edit_meta=_set(["params", "seed"], 9)),
    "size": dict(edit_meta=_set(["image_shape"], [48, 48])),
    "branches swapped": dict(edit_meta=_swap_branches),
    "spliced tensors": "other",
}


def _forged(payload, other_payload, what):
    spec = FORGERIES[what]
    if spec == "other":
        theirs = {n: t for n, t in __import__("safetensors.torch", fromlist=["load"]).load(serialize(other_payload)).items()}
        spec = dict(edit_tensors=lambda t: t.update(theirs))
    good = serialize(payload)
    bad = _forge(good, **spec)
    assert len(bad) == len(good) and bad != good
    return bad


@pytest.mark.parametrize("what", sorted(FORGERIES))
def test_a_forged_payload_passes_the_crc_but_not_the_shared_memory_connector(payload, other_payload, tiny_model, what):
    from multiprocessing import shared_memory

    from bagel_model.serving.connectors import SharedMemoryConnector

    bad = _forged(payload, other_payload, what)
    deserialize(bad)  # the CRC-32 sees nothing wrong: it is not a MAC
    conn = SharedMemoryConnector()
    notices, pipe = [], conn._tx

    class Tap:  # the test reads the segment's name; a forger would find it in /dev/shm
        def send(self, msg):
            notices.append(msg)
            pipe.send(msg)
    conn._tx = Tap()
    conn.send(serialize(payload))
    shm = shared_memory.SharedMemory(name=notices[0][0])
    shm.buf[:len(bad)] = bad  # rewritten in place after stage 0 sent it
    shm.close()
    with pytest.raises(PayloadError, match="not authentic: its HMAC-SHA256 does not match this run's key"):
        recv_payload(conn, timeout=5, model=tiny_model, request_id="req-A")


@pytest.mark.parametrize("what", ["seed", "spliced tensors"])
def test_a_forged_payload_is_refused_by_the_torch_distributed_connector(payload, other_payload, monkeypatch, what):
    """dist.send/recv replaced by an in-memory wire (the rank-to-rank transport is not what is tested here)."""
    import torch.distributed as dist

    from bagel_model.serving.payload import new_run_key

    from bagel_model.serving.connectors import TorchDistributedConnector

    wire = []
    monkeypatch.setattr(dist, "send", lambda t, peer: wire.append(t.clone()))
    monkeypatch.setattr(dist, "recv", lambda t, peer: t.copy_(wire.pop(0)))
    key = new_run_key()
    a, b = TorchDistributedConnector(1, key=key), TorchDistributedConnector(0, key=key)
    good = serialize(payload)
    a.send(good)
    assert b.recv() == good
    a.send(good)
    bad = _forged(payload, other_payload, what)
    wire[1][:len(bad)] = torch.frombuffer(bytearray(bad), dtype=torch.uint8)  # the bytes rewritten on the way
    with pytest.raises(PayloadError, match="not authentic"):
        b.recv()
    a.send(good)  # a receiver with another run's key refuses even the genuine bytes
    with pytest.raises(PayloadError, match="not authentic"):
        TorchDistributedConnector(0, key=new_run_key()).recv()


def test_a_forged_message_is_refused_by_the_tensor_connector(payload, tiny_model):
    from bagel_model.serving.payload import _canonical, _layout_of, _tensor_sums
    import zlib

    conn = TensorQueueConnector()

    def forged(tag):  # a consistent header (CRC and sums recomputed) for another seed
        header, tensors = _pack(dataclasses.replace(payload, params=dataclasses.replace(payload.params, seed=9)),
                                to_cpu=False)
        header["sums"], header["tensors"] = _tensor_sums(tensors), _layout_of(tensors)
        header["checksum"] = f"{zlib.crc32(_canonical(header)):08x}"
        return (header, tensors) if tag is None else (header, tensors, tag)

    conn._q.put(forged(None))
    with pytest.raises(PayloadError, match="carries no HMAC"):
        recv_payload(conn, timeout=30)
    conn._q.put(forged(bytes(32)))
    with pytest.raises(PayloadError, match="not authentic"):
        recv_payload(conn, timeout=30)
    send_payload(conn, payload)  # the genuine one still passes
    assert recv_payload(conn, timeout=30, model=tiny_model, request_id="req-A").params.seed == payload.params.seed


def test_the_run_key_is_never_in_the_payload(payload):
    from bagel_model.serving.payload import new_run_key
    from bagel_model.serving.connectors import SharedMemoryConnector

    key = new_run_key()
    conn = SharedMemoryConnector(key=key)
    assert key not in serialize(payload)
    with pytest.raises(ValueError, match="at least 16 random bytes"):
        SharedMemoryConnector(key=b"short")
    conn.cleanup()


# ---- issue 29: payload edge cases name the payload -------------------------------------------------------------
def _edge(payload, case):
    """A received payload with one defect (as deserialize would hand it on: the sender's checksum is valid)."""
    full = payload.contexts["full"]
    if case == "heads in layer 1":  # layer 0 is fine: only a check of every layer sees it
        return dataclasses.replace(payload, contexts={**payload.contexts, "full": dataclasses.replace(
            full, k=[full.k[0], full.k[1][:, :1]], v=list(full.v))})
    if case == "head_dim of V":
        return dataclasses.replace(payload, contexts={**payload.contexts, "full": dataclasses.replace(
            full, k=list(full.k), v=[full.v[0], full.v[1][..., :8]])})
    if case == "nan in V":
        v1 = full.v[1].clone()
        v1[1, 0, 3] = float("nan")
        return dataclasses.replace(payload, contexts={**payload.contexts, "full": dataclasses.replace(
            full, k=list(full.k), v=[full.v[0], v1])})
    if case == "inf in K":
        k0 = full.k[0].clone()
        k0[0, 1, 0] = float("-inf")
        return dataclasses.replace(payload, contexts={**payload.contexts, "full": dataclasses.replace(
            full, k=[k0, full.k[1]], v=list(full.v))})
    if case == "missing branch context":
        return dataclasses.replace(payload, contexts={"full": full})
    raise AssertionError(case)


EDGE_ROWS = [
    ("heads in layer 1", "'full' layer 1 K: shape"),
    ("head_dim of V", "'full' layer 1 V: shape"),
    ("nan in V", "KV payload of request 'req-A' holds non-finite (NaN/Inf) K/V in 1 tensor(s): full layer 1 V"),
    ("inf in K", "non-finite (NaN/Inf) K/V in 1 tensor(s): full layer 0 K"),
    ("missing branch context", "branches {'text': 'text'} name contexts it does not carry (it has ['full'])"),
]


@pytest.mark.parametrize("case,msg", EDGE_ROWS, ids=[r[0] for r in EDGE_ROWS])
def test_payload_edge_cases_name_the_payload(payload, tiny_model, case, msg):
    with pytest.raises(PayloadError) as e:
        validate_payload(_edge(payload, case), tiny_model, "req-A")
    assert msg in str(e.value), str(e.value)


def test_a_str_payload_is_named():
    with pytest.raises(PayloadError, match="KV payload must be bytes .*got str"):
        deserialize("x" * 100)


def test_a_vanished_shared_memory_segment_is_named(payload):
    from multiprocessing import shared_memory

    from bagel_model.serving.connectors import SharedMemoryConnector

    conn = SharedMemoryConnector()
    notices, pipe = [], conn._tx

    class Tap:
        def send(self, msg):
            notices.append(msg)
            pipe.send(msg)
    conn._tx = Tap()
    conn.send(serialize(payload))
    seg = shared_memory.SharedMemory(name=notices[0][0])
    seg.close()
    seg.unlink()  # gone before stage 1 reads it
    with pytest.raises(PayloadError, match=f"the shared-memory segment '{notices[0][0]}' holding the KV payload .* is gone"):
        conn.recv(timeout=5)
