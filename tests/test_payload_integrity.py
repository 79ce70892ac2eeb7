"""The KV payload between stages is checked whole: any altered header field or tensor row, a payload of another
request, or one that does not fit the receiving model is an error naming what is wrong — never an image."""
import dataclasses
import json

import pytest
import torch

from bagel_model.serving.kv_transfer import (KVPayload, PayloadError, TensorQueueConnector, _pack, deserialize, extract,
                                     recv_payload, send_payload, serialize, validate_payload)
from bagel_model.serving.stages import Request, run_stage0
from bagel_model.core.sampling import SamplingParams


@pytest.fixture(scope="module")
def payload(tiny_model, tokenizer):
    req = Request("text2img", "a red cube", SamplingParams(steps=3, height=32, width=32), request_id="req-A")
    return run_stage0(tiny_model, tokenizer, req, send=lambda p: None).payload


def _resave(data: bytes, edit_meta=None, edit_tensors=None) -> bytes:
    """The payload's tensors and header, edited, saved again with the ORIGINAL checksum (what corruption in
    transit, or a mix-up, would produce)."""
    from safetensors import safe_open
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
        from bagel_model.serving.kv_transfer import _canonical, _layout_of, _tensor_sums
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
