"""Two-stage serving (AR -> DiT): split == single stage bit for bit, KV layouts round-trip, KV-ready forwarding,
every request parameter reaches stage 1, malformed payloads are rejected."""
import contextlib
import dataclasses
import os
import time

import pytest
import torch

from bagel_kernels import LAYOUTS
from bagel_model.core.sampling import CacheConfig, SamplingParams
from bagel_model.serving.payload import PayloadError, deserialize, extract, install, serialize
from bagel_model.serving.connectors import InProcessConnector
from bagel_model.engine.decode import greedy_decode
from bagel_model.engine.prefill import TextBlock, positions_and_spans, prefill
from bagel_model.serving.stages import EventLog, Request, run_split_threads, run_stage0, run_stage1
from bagel_model.pipeline import BagelPipeline


@pytest.fixture(scope="module")
def image():
    return (torch.rand(32, 48, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)


@pytest.fixture(scope="module")
def pipe(tiny_model, tokenizer):
    return BagelPipeline(tiny_model, tokenizer)


def params(h=32, w=48, **kw):
    return SamplingParams(steps=4, height=h, width=w, **kw)


@pytest.mark.parametrize("mode", ["text2img", "img2img"])
@pytest.mark.parametrize("layout1", ["flashinfer_hnd", "packed"])
def test_split_threads_match_single_stage(pipe, tiny_model, tokenizer, image, mode, layout1):
    req = Request(mode, "a red cube", params(), image if mode == "img2img" else None, max_tokens=6)
    _, single = pipe.generate(req)
    r0, split = run_split_threads(tiny_model, tiny_model, tokenizer, req, InProcessConnector(), layout1=layout1)
    assert split.latent_md5 == single.latent_md5 and split.image_md5 == single.image_md5
    assert r0.text_ids  # the AR stage decoded while stage 1 ran


@pytest.mark.parametrize("connector", ["shm", "tensor"])
def test_split_processes_match_single_stage(pipe, image, connector):
    """Two spawned processes, shared-memory bytes or the tensors themselves, flash_attn -> flashinfer_nhd."""
    from bagel_model.serving.split import ModelSpec, run_split_processes

    for mode in ("text2img", "img2img"):
        req = Request(mode, "a red cube", params(), image if mode == "img2img" else None, max_tokens=4)
        _, single = pipe.generate(req)
        # a per-stage environment (what the one-GPU MPS benchmark uses to cap stage 0's SMs) changes no bits
        env = {"stage0": {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "50"}} if connector == "shm" else None
        # and so do the placement options (a no-op stream priority on the CPU, stage 0's device named explicitly)
        placement = {"stage0_device": "cpu", "stage1_stream_priority": -1} if connector == "tensor" else {}
        res = run_split_processes(ModelSpec(preset="tiny", seed=0), req, layout1="flashinfer_nhd", connector=connector,
                                  stage_env=env, **placement)
        assert res["stage1"]["image_md5"] == single.image_md5, mode
        assert res["stage1"]["latent_md5"] == single.latent_md5, mode


def test_split_processes_reject_stages_on_different_kinds_of_device():
    from bagel_model.serving.split import ModelSpec, run_split_processes

    req = Request("text2img", "a red cube", params(), None, max_tokens=1)
    with pytest.raises(ValueError, match="same kind of device"):
        run_split_processes(ModelSpec(preset="tiny", seed=0), req, connector="tensor", stage0_device="cuda:0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_split_processes_across_two_gpus_match_single_stage():
    """The seeds' placement: the AR stage on a second GPU, the KV handed over by IPC and copied peer to peer."""
    from bagel_model.serving.split import ModelSpec, run_split_processes

    spec = ModelSpec(preset="tiny", seed=0, device="cuda:0")
    model, tok = spec.load()
    req = Request("text2img", "a red cube", params(), None, max_tokens=8, ignore_eos=True)
    _, single = BagelPipeline(model, tok).generate(Request(req.mode, req.prompt, req.params, None, 0))
    res = run_split_processes(spec, req, connector="tensor", stage0_device="cuda:1", stage1_stream_priority=-1)
    assert res["stage1"]["image_md5"] == single.image_md5
    assert len(res["stage0"]["text_ids"]) == 8


def test_split_processes_reject_an_unknown_stage_environment(image):
    from bagel_model.serving.split import ModelSpec, run_split_processes

    req = Request("text2img", "a red cube", params(), None, max_tokens=1)
    with pytest.raises(ValueError, match="stage_env keys"):
        run_split_processes(ModelSpec(preset="tiny", seed=0), req, stage_env={"stage2": {"X": "1"}})


@pytest.mark.parametrize("src", LAYOUTS)
@pytest.mark.parametrize("dst", LAYOUTS)
def test_kv_layouts_round_trip_bitwise(tiny_model, src, dst):
    ctx, _ = prefill(tiny_model, [TextBlock(list(range(10, 47)))], layout=src)
    payload_ctx = extract(ctx)
    got = install(tiny_model, deserialize(serialize(_payload(payload_ctx))).contexts["full"], dst)
    assert got.cache.layout == dst and got.cache.length == ctx.cache.length
    for i in range(tiny_model.cfg.num_layers):
        for a, b in zip(ctx.cache.read(i), got.cache.read(i)):
            assert torch.equal(a, b)


def _payload(ckv, p=None):
    from bagel_model.serving.payload import KVPayload

    return KVPayload("r1", "text2img", p or params(), (32, 48), {"full": ckv}, {"full": "full", "img": "full"},
                     {"note": "custom"})


def test_kv_ready_forwarding_starts_stage1_before_decode_ends(tiny_model, tokenizer):
    """With a large max_tokens, stage 0 pauses at its second decoded token until stage 1 has finished a denoise
    step. Forwarding at KV-ready lets that happen; forwarding after decode would leave stage 0 waiting forever
    (the bounded wait then records a failure)."""
    events = EventLog()
    waited = {}

    def on_token(i, tok):
        if i == 1:
            deadline = time.monotonic() + 120
            while "dit_step" not in events.names() and time.monotonic() < deadline:
                time.sleep(0.005)
            waited["saw_dit_step"] = "dit_step" in events.names()

    req = Request("text2img", "a red cube", params(), max_tokens=64, ignore_eos=True)  # the decode must run long
    run_split_threads(tiny_model, tiny_model, tokenizer, req, InProcessConnector(), events=events, on_token=on_token)
    names = events.names()
    assert waited["saw_dit_step"]
    assert names.index("kv_forwarded") < names.index("stage1_start") < names.index("dit_step") < names.index("stage0_done")


def test_every_request_parameter_reaches_stage1(pipe, tiny_model, tokenizer):
    """Each field is set away from its default, so a field dropped on the way (and defaulted) fails the test."""
    p = SamplingParams(steps=3, seed=11, height=32, width=16, timestep_shift=2.5, cfg_text_scale=3.0,
                       cfg_img_scale=1.25, cfg_interval=(0.1, 0.9), cfg_renorm_min=0.5, cfg_renorm_type="channel",
                       cache=CacheConfig(policy="fixed", warmup=1, interval=2))
    default = SamplingParams()
    for f in dataclasses.fields(SamplingParams):
        assert getattr(p, f.name) != getattr(default, f.name), f"test must set {f.name} away from its default"
    sent = []
    r0 = run_stage0(tiny_model, tokenizer, Request("text2img", "x", p), send=sent.append)
    assert sent == [r0.payload]
    received = deserialize(serialize(r0.payload))
    assert received.params == p and received.image_shape == (32, 16)
    result = run_stage1(tiny_model, received)
    assert result.params == p and result.image.shape == (32, 16, 3)
    with pytest.raises(ValueError, match="missing \\['seed'\\]"):
        SamplingParams.from_dict({k: v for k, v in p.to_dict().items() if k != "seed"})


def test_malformed_payloads_are_rejected(tiny_model):
    ctx, _ = prefill(tiny_model, [TextBlock([1, 2, 3, 4, 5])])
    good = serialize(_payload(extract(ctx)))
    assert deserialize(good).extra == {"note": "custom"}
    with pytest.raises(PayloadError, match="too short"):
        deserialize(b"")
    with pytest.raises(PayloadError, match="malformed or truncated"):
        deserialize(good[:-7])
    with pytest.raises(PayloadError, match="malformed or truncated"):
        deserialize(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    tampered = bytearray(good)
    tampered[-3] ^= 0xFF
    with pytest.raises(PayloadError, match="checksum"):
        deserialize(bytes(tampered))
    from safetensors.torch import save
    with pytest.raises(PayloadError, match="bagel-kv header"):
        deserialize(save({"x": torch.zeros(2)}))


def test_tensor_connector_checks_what_arrives(tiny_model):
    from bagel_model.serving.payload import _pack
    from bagel_model.serving.connectors import TensorQueueConnector, recv_payload, send_payload

    ctx, _ = prefill(tiny_model, [TextBlock([1, 2, 3, 4, 5])])
    conn = TensorQueueConnector()
    send_payload(conn, _payload(extract(ctx)))
    got = recv_payload(conn, timeout=30)
    assert got.extra == {"note": "custom"} and torch.equal(got.contexts["full"].k[0], extract(ctx).k[0])
    conn.close(timeout=30)  # the receipt was acknowledged: nothing held any more
    assert not conn._held
    header, tensors = _pack(_payload(extract(ctx)), to_cpu=False)
    header["sums"] = {n: 0 for n in tensors}
    conn._q.put((header, tensors))
    with pytest.raises(PayloadError, match="checksum"):
        recv_payload(conn, timeout=30)
    conn._q.put(("not", "a payload"))
    with pytest.raises(PayloadError, match="malformed"):
        recv_payload(conn, timeout=30)
    conn.abort()
    with pytest.raises(PayloadError, match="aborted"):
        recv_payload(conn, timeout=30)
    with pytest.raises(TimeoutError, match="tensor connector"):
        recv_payload(conn, timeout=0.1)


def test_positions_are_shared_inside_image_blocks():
    pos, span, nxt = positions_and_spans([(3, False), (5, True), (2, False)], 4, "cpu")
    assert pos.tolist() == [4, 5, 6, 7, 7, 7, 7, 7, 8, 9] and nxt == 10
    assert span.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1, -1, -1]


def test_text_modes_decode(tiny_model, tokenizer, image):
    for mode in ("text2text", "img2text"):
        r = run_stage0(tiny_model, tokenizer, Request(mode, "hello", params(), image, max_tokens=5))
        assert 1 <= len(r.text_ids) <= 5 and r.payload is None
    with pytest.raises(ValueError, match="needs an input image"):
        Request("img2img", "x", params()).validate()
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        Request("text2text", "x", params()).validate()


def test_stage0_failure_is_reported_not_hung(tiny_model, tokenizer):
    req = Request("text2img", "x", params(h=40, w=40))  # 40 is not a multiple of 16
    with pytest.raises((RuntimeError, ValueError)):
        run_split_threads(tiny_model, tiny_model, tokenizer, req, InProcessConnector())


def _dist_worker(rank, path, payload_bytes, out, key):
    import torch.distributed as dist

    from bagel_model.serving.connectors import TorchDistributedConnector

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    conn = TorchDistributedConnector(peer=1 - rank, key=key)  # the run's key, from the parent over spawn's pipe
    if rank == 0:
        conn.send(payload_bytes)
    else:
        got = conn.recv()
        torch.save(deserialize(got).contexts["full"].k[0], out)
    dist.destroy_process_group()


def test_torch_distributed_connector(tiny_model, tmp_path):
    import torch.multiprocessing as mp

    ctx, _ = prefill(tiny_model, [TextBlock([7, 8, 9])])
    ckv = extract(ctx)
    data = serialize(_payload(ckv))
    out = str(tmp_path / "k0.pt")
    from bagel_model.serving.payload import new_run_key

    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), data, out, new_run_key()), nprocs=2, join=True)
    assert torch.equal(torch.load(out), ckv.k[0])


@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="CUDA graphs need a GPU and compiled kernels: TRITON_INTERPRET=0 pytest ... on the GPU")
def test_graph_decoding_gives_the_eager_tokens(tiny_cfg):
    from bagel_model.core.model import BagelModel

    model = BagelModel.random(tiny_cfg, seed=0, dtype=torch.bfloat16, device="cuda")
    runs = []
    for use_graph in (False, True):
        ctx, h = prefill(model, [TextBlock(list(range(10, 47)))], extra_capacity=40)
        runs.append(greedy_decode(model, ctx, h, 30, eos_id=-1, use_graph=use_graph))
    assert len(runs[0]) == 30 and runs[0] == runs[1]
    # stopped by EOS: the graph loop's look-ahead step is taken back (same length and seqlens as the eager loop)
    eos = runs[0][12]
    ends = []
    for use_graph in (False, True):
        ctx, h = prefill(model, [TextBlock(list(range(10, 47)))], extra_capacity=40)
        ends.append((greedy_decode(model, ctx, h, 30, eos_id=eos, use_graph=use_graph), ctx.cache.length,
                     ctx.cache.seqlens.cpu()))
    assert ends[0][0] == ends[1][0] and ends[0][1] == ends[1][1] and torch.equal(ends[0][2], ends[1][2])


def test_one_process_makes_no_transfer_payload(tiny_model, tokenizer, monkeypatch):
    """Without a connector nothing is sent, so nothing is copied into a payload: stage 1 reads stage 0's contexts."""
    import bagel_model.serving.stages as stages

    def refuse(*a, **k):
        raise AssertionError("a payload was built although nothing is sent")

    monkeypatch.setattr(stages, "extract", refuse)
    r0 = stages.run_stage0(tiny_model, tokenizer, Request("text2img", "x", SamplingParams(steps=2, height=16,
                                                                                            width=16)))
    assert r0.payload is None and r0.diffusion.contexts["img"] is r0.diffusion.contexts["full"]
    (res,) = stages.run_stage1_batch(tiny_model, [r0.diffusion])
    assert res.image.shape == (16, 16, 3)


@contextlib.contextmanager
def _kernel_backend(model, backend: str):
    """The shared tiny model with its kernels on ``backend`` for the block, restored after."""
    kept = model.kernels
    model.kernels = dataclasses.replace(kept, backend=backend)
    try:
        yield
    finally:
        model.kernels = kept


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_graph_decoders_device_step_gives_the_eager_tokens_and_cache(tiny_model, backend):
    """What the CUDA graph records — ``GraphDecoder._step``, the token's page and slot computed once for all
    layers, each layer's K/V stored by the QK-norm + RoPE kernel itself (``SlotSink``; with the reference
    kernels, by ``write_token_slots``) — run eagerly (on the CPU): the eager loop's tokens (its cache written by
    the prefill's scatters), and the same K/V in the cache, bit for bit."""
    with _kernel_backend(tiny_model, backend):
        _check_device_step(tiny_model)


def test_decode_step_writes_the_cache_without_a_scatter(tiny_model):
    """With the Triton kernels, the token step's K/V reach the paged cache through the QK-norm + RoPE kernel's own
    stores: no index_put (two scatter kernels per layer on the GPU) in the step the CUDA graph records."""
    from torch.profiler import ProfilerActivity, profile

    from bagel_model.engine.decode import GraphDecoder

    with _kernel_backend(tiny_model, "triton"):
        ctx, _ = prefill(tiny_model, [TextBlock(list(range(10, 20)))], extra_capacity=4)
        dec = GraphDecoder(tiny_model, ctx, 7, record=False)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            dec._step()
    ops = [e.name for e in prof.events()]
    assert "aten::embedding" in ops  # the profile saw the step
    assert not [n for n in ops if n.startswith("aten::index_put")]


def _check_device_step(tiny_model) -> None:
    from bagel_model.engine.decode import GraphDecoder

    prompt, steps = [TextBlock(list(range(10, 47)))], 12  # 37 + 12 tokens cross a 16-token page boundary
    ctx, h = prefill(tiny_model, prompt, extra_capacity=40)
    want = greedy_decode(tiny_model, ctx, h, steps + 1, eos_id=-1, use_graph=False)
    ctx2, _ = prefill(tiny_model, prompt, extra_capacity=40)
    dec = GraphDecoder(tiny_model, ctx2, want[0])
    got = [want[0]]
    with torch.no_grad():
        for _ in range(steps):
            dec._step()
            ctx2.cache.length += 1
            got.append(int(dec.token))
    assert got == want
    assert ctx2.cache.length == ctx.cache.length == 37 + steps  # each step wrote the token it fed
    for layer in range(ctx.cache.num_layers):
        for a, b in zip(ctx.cache.read(layer), ctx2.cache.read(layer)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("look_ahead", [True, False])
@pytest.mark.parametrize("stop", ["eos", "max_tokens", "full cache"])
def test_decoding_one_step_ahead_gives_the_one_step_loops_tokens_and_cache(tiny_model, stop, look_ahead):
    """The look-ahead loop (``decode_ahead``: the step for token i+2 launched before token i+1 is read, taken back
    when token i+1 ends the decoding) on the eager device step: the one-step loop's tokens, cache length, device
    seqlens and K/V bit for bit, whichever way it stops — and the cache goes on as if the extra step never ran.
    ``look_ahead=False`` (each step after the previous token is read, bench_decode's peer) gives the same."""
    from bagel_model.engine.decode import GraphDecoder, decode_ahead

    prompt = [TextBlock(list(range(10, 47)))]
    free = {"eos": 40, "max_tokens": 40, "full cache": 9}[stop]
    ctx, h = prefill(tiny_model, prompt, extra_capacity=free)
    free = ctx.cache.capacity - ctx.cache.length
    probe = greedy_decode(tiny_model, prefill(tiny_model, prompt, extra_capacity=40)[0], h, 20, eos_id=-1,
                          use_graph=False)
    eos = probe[7] if stop == "eos" else -1  # stops on the first time that token comes
    budget = 6 if stop == "max_tokens" else 30
    want = greedy_decode(tiny_model, ctx, h, budget, eos_id=eos, use_graph=False)
    ctx2, _ = prefill(tiny_model, prompt, extra_capacity=free)
    assert ctx2.cache.capacity == ctx.cache.capacity
    seen: list[tuple[int, int]] = []
    dec = GraphDecoder(tiny_model, ctx2, want[0], record=False)
    with torch.no_grad():
        got = decode_ahead(dec, want[0], budget, eos, on_token=lambda i, t: seen.append((i, t)), look_ahead=look_ahead)
    assert got == want and seen == list(enumerate(want))
    if stop == "full cache":
        assert ctx2.cache.length == ctx2.cache.capacity and len(got) < budget
    assert dec.in_flight == 0 and ctx2.cache.length == ctx.cache.length
    assert torch.equal(ctx2.cache.seqlens, ctx.cache.seqlens)
    assert int(dec.slot) == ctx2.cache.length and int(dec.position) == dec.rope_position
    assert decode_ahead(dec, 5, 0, eos) == greedy_decode(tiny_model, ctx, h, 0, eos, use_graph=False) == []
    for layer in range(ctx.cache.num_layers):
        for a, b in zip(ctx.cache.read(layer), ctx2.cache.read(layer)):
            assert torch.equal(a, b)


def test_graph_decoder_needs_a_prefilled_context(tiny_model):
    from bagel_model.engine.decode import GraphDecoder
    from bagel_model.engine.kv_cache import Context, new_cache

    with pytest.raises(ValueError, match="cache is empty"):
        GraphDecoder(tiny_model, Context(new_cache(tiny_model, 8, "flash_attn"), 0), 1)


def test_a_payload_naming_a_context_it_does_not_carry_is_a_payload_error(tiny_model, tokenizer):
    """Stage 1 given an unvalidated payload whose branch map names a missing context: a PayloadError naming the
    request, not a KeyError."""
    from bagel_model.serving.payload import PayloadError
    from bagel_model.serving.stages import run_stage1

    r0 = run_stage0(tiny_model, tokenizer, Request("text2img", "x", SamplingParams(steps=2, height=16, width=16)),
                    send=lambda p: None)
    bad = dataclasses.replace(r0.payload, branches={"full": "full", "text": "gone", "img": "full"})
    with pytest.raises(PayloadError, match="request 'request-0'.*\\['gone'\\]"):
        run_stage1(tiny_model, bad)
