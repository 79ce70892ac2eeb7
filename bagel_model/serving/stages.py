"""BAGEL as two stages: stage 0 (AR: packed prefill of the CFG contexts, optional greedy decode) and stage 1 (DiT:
denoise against the transferred KV, VAE decode). Single-stage runs both in one process without a connector; split
runs hand the KV over through a connector the moment it exists ("KV ready") — stage 0's decode goes on in parallel.

Modes: text2img, img2img (image editing), text2text, img2text. Context layout per mode (DESIGN.md §1, §7):
- text2img: full = [text]; cfg_text = empty; cfg_img = full.
- img2img: full = [VAE block, ViT block, text]; cfg_text = [VAE block, ViT block]; cfg_img = [text].
- text2text: [text] then decode; img2text: [ViT block, text] then decode.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.decode import greedy_decode
from ..engine.denoise import DenoiseRequest, SamplingParams, denoise_batch
from ..engine.step import PackedStep
from ..engine.output import GenerationResult, decode_latent, tensor_md5
from .kv_transfer import KVPayload, abort, extract, install, recv_payload, send_payload
from ..core.model import BagelModel, BranchContext
from ..engine.prefill import PrefilledContext, TextBlock, new_cache, prefill, vae_block, vit_block
from ..core.tokenizer import BagelTokenizer
from ..core.transforms import vae_resize_rule

MODES = ("text2img", "img2img", "text2text", "img2text")
IMAGE_OUT, IMAGE_IN = ("text2img", "img2img"), ("img2img", "img2text")


@dataclass
class Request:
    mode: str
    prompt: str  # "" when the prompt is given as ``prompt_ids``
    params: SamplingParams
    image: torch.Tensor | None = None  # (H, W, 3) uint8 input for img2img / img2text, any size (resized as upstream)
    max_tokens: int = 0  # greedy decode budget of stage 0: answer tokens (text outputs, or "thinking" before an image)
    request_id: str = "request-0"
    ignore_eos: bool = False  # decode all max_tokens (benchmarks, tests), as serving engines' ignore_eos
    # The prompt as token ids instead of text (a checkpoint without tokenizer files, or ids from another tokenizer);
    # without the chat markers, which are added as for text: [<|im_start|>] + ids + [<|im_end|>].
    prompt_ids: list[int] | None = None

    def validate(self) -> "Request":
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
        if self.prompt_ids is not None and self.prompt:
            raise ValueError("give the prompt as text or as prompt_ids, not both")
        if self.mode in IMAGE_IN and self.image is None:
            raise ValueError(f"mode {self.mode} needs an input image")
        if self.mode in ("text2text", "img2text") and self.max_tokens < 1:
            raise ValueError(f"mode {self.mode} produces text: max_tokens must be >= 1, got {self.max_tokens}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        self.params.validate()
        return self


class EventLog:
    """Ordered record of pipeline events (thread-safe). ``time.monotonic`` is one clock for all processes of a host."""

    def __init__(self):
        self._lock = threading.Lock()
        self.events: list[tuple[str, float]] = []

    def record(self, name: str) -> None:
        with self._lock:
            self.events.append((name, time.monotonic()))

    def names(self) -> list[str]:
        with self._lock:
            return [n for n, _ in self.events]


@dataclass
class Stage0Result:
    payload: KVPayload | None
    contexts: dict[str, PrefilledContext] = field(default_factory=dict)
    text_ids: list[int] = field(default_factory=list)
    text: str = ""


def prompt_block(model: BagelModel, tok: BagelTokenizer, req: Request) -> TextBlock:
    """The request's prompt as a text block: ``[<|im_start|>] + tokens + [<|im_end|>]`` (upstream's prepare_prompts)."""
    if req.prompt_ids is not None:
        return TextBlock(tok.wrap_prompt_ids(req.prompt_ids, model.cfg.llm.vocab_size))
    return TextBlock(tok.encode_prompt(req.prompt))


def input_image(model: BagelModel, req: Request) -> torch.Tensor:
    """The request's image as upstream's inferencer takes it in: resized by the VAE-side rule first, in every image
    mode (an edited image has this size; the ViT's own resize starts from it)."""
    return vae_resize_rule(model.cfg)(req.image)


def _image_contexts(model: BagelModel, tok: BagelTokenizer, req: Request, extra: int
                    ) -> tuple[dict[str, PrefilledContext], dict[str, str], tuple[int, int]]:
    text = prompt_block(model, tok, req)
    if req.mode == "text2img":
        full, _ = prefill(model, [text], extra_capacity=extra)
        empty = PrefilledContext(new_cache(model, 1, "flash_attn"), 0)
        return {"full": full, "text": empty}, {"full": "full", "text": "text", "img": "full"}, \
            (req.params.height, req.params.width)
    image = input_image(model, req)
    vae, vit = vae_block(model, image, req.params.seed), vit_block(model, image)
    full, _ = prefill(model, [vae, vit, text], extra_capacity=extra)
    no_text, _ = prefill(model, [vae, vit])
    no_img, _ = prefill(model, [text])
    h, w = image.shape[:2]
    return {"full": full, "text": no_text, "img": no_img}, {"full": "full", "text": "text", "img": "img"}, (h, w)


@torch.no_grad()
def run_stage0(model: BagelModel, tok: BagelTokenizer, req: Request, send=None, events: EventLog | None = None,
               on_token=None) -> Stage0Result:
    """Prefill the request's contexts; for image outputs build the KV payload and ``send`` it at once (KV ready),
    then decode up to ``max_tokens`` greedily. ``send`` takes the ``KVPayload`` (e.g. ``partial(send_payload,
    connector)``) or is None (single stage)."""
    req.validate()
    events = events or EventLog()
    events.record("stage0_start")
    eos = -1 if req.ignore_eos else tok.special["eos_token_id"]
    result = Stage0Result(payload=None)
    if req.mode in IMAGE_OUT:
        contexts, branches, shape = _image_contexts(model, tok, req, req.max_tokens)
        payload = KVPayload(req.request_id, req.mode, req.params, shape,
                            {n: extract(c) for n, c in contexts.items()}, branches)
        events.record("kv_ready")
        if send is not None:
            send(payload)
            events.record("kv_forwarded")
        result.payload, result.contexts = payload, contexts
        # decode appends to a fork: the contexts handed to stage 1 keep exactly the prefill KV
        decode_ctx = PrefilledContext(contexts["full"].cache.fork(), contexts["full"].rope_position)
    else:
        blocks = ([vit_block(model, input_image(model, req))] if req.mode == "img2text" else []) \
            + [prompt_block(model, tok, req)]
        # capacity: the <|im_start|> fed below plus max_tokens - 1 decoded tokens fed back (the last one is not)
        decode_ctx, _ = prefill(model, blocks, extra_capacity=req.max_tokens)
        events.record("prefill_done")
    if req.max_tokens > 0:
        decode_ctx, last = _start_answer(model, decode_ctx, tok.special["bos_token_id"])
        ids = greedy_decode(model, decode_ctx, last, req.max_tokens, eos, on_token=on_token)
        # upstream stops before the end-of-turn token: it is not part of the answer
        result.text_ids = ids[:-1] if ids and ids[-1] == eos else ids
        result.text = tok.decode(result.text_ids)
    events.record("stage0_done")
    return result


def _start_answer(model: BagelModel, ctx: PrefilledContext, bos: int) -> tuple[PrefilledContext, torch.Tensor]:
    """The context and hidden state that predict the first answer token. The prompt ends with <|im_end|>; as
    upstream's ``prepare_start_tokens``/``generate_text`` do, the answer turn starts from <|im_start|> fed at the
    next position (appended to ``ctx``); decoding continues from its row and from the position after it."""
    return prefill(model, [TextBlock([bos])], context=ctx)


@torch.no_grad()
def run_stage1(model: BagelModel, payload: KVPayload, contexts: dict[str, PrefilledContext] | None = None,
               layout: str = "flash_attn", events: EventLog | None = None, progress: bool = False,
               engine=None) -> GenerationResult:
    """Denoise against the payload's contexts (installed into a ``layout`` cache unless given) and decode."""
    return run_stage1_batch(model, [payload], [contexts], layout, events, progress, engine)[0]


@torch.no_grad()
def run_stage1_batch(model: BagelModel, payloads: list[KVPayload],
                     contexts: list[dict[str, PrefilledContext] | None] | None = None, layout: str = "flash_attn",
                     events: EventLog | None = None, progress: bool = False, engine=None,
                     on_step: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None
                     ) -> list[GenerationResult]:
    """Denoise several requests together — every step's CFG jobs of all of them in one packed forward
    (``denoise_step.PackedStep`` unless ``engine`` is given) — and decode each. Each result is bit-identical to
    the request's run alone. ``on_step(payload_index, step, t, x)`` is ``denoise_batch``'s per-request step hook."""
    events = events or EventLog()
    events.record("stage1_start")
    contexts = contexts or [None] * len(payloads)
    reqs = []
    for payload, ctxs in zip(payloads, contexts):
        p = payload.params
        if ctxs is None:
            ctxs = {n: install(model, c, layout) for n, c in payload.contexts.items()}
        # one BranchContext per stored context: branches naming the same one (text-to-image's cfg_img = full) share
        # it, which makes them one job of the packed step
        named = {n: _branch(ctxs[n]) for n in set(payload.branches.values())}
        reqs.append(DenoiseRequest.start(model.cfg, p, {b: named[n] for b, n in payload.branches.items()},
                                         model.device, size=payload.image_shape))
    engine = engine if engine is not None else PackedStep(model)
    first = [True]

    def step_hook(i: int, k: int, t: float, x: torch.Tensor) -> torch.Tensor | None:
        if first[0]:
            events.record("dit_step")
            first[0] = False
        return on_step(i, k, t, x) if on_step is not None else None

    xs = denoise_batch(reqs, engine, progress=progress, on_step=step_hook)
    out = []
    for payload, r, x in zip(payloads, reqs, xs):
        image = decode_latent(model, x, r.grid)
        out.append(GenerationResult(x, image, tensor_md5(x), tensor_md5(image), payload.params))
    events.record("stage1_done")
    return out


def _branch(ctx: PrefilledContext) -> BranchContext:
    return BranchContext(kv=ctx.cache.segments(), rope_position=ctx.rope_position, length=ctx.cache.length)


def run_split_threads(model0: BagelModel, model1: BagelModel, tok: BagelTokenizer, req: Request, connector,
                      layout1: str = "flash_attn", events: EventLog | None = None, on_token=None
                      ) -> tuple[Stage0Result, GenerationResult]:
    """Stage 0 in a thread, stage 1 in the caller, joined by ``connector``: the in-process split."""
    events = events or EventLog()
    box: dict = {}

    sent = threading.Event()

    def send(payload: KVPayload) -> None:
        sent.set()
        send_payload(connector, payload)

    def stage0():
        try:
            box["r0"] = run_stage0(model0, tok, req, send=send, events=events, on_token=on_token)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["err"] = e
            if not sent.is_set():
                abort(connector)  # wake stage 1 at once instead of letting it wait for its timeout

    t = threading.Thread(target=stage0, name="bagel-stage0", daemon=True)
    t.start()
    try:
        r1 = run_stage1(model1, recv_payload(connector, model=model1, request_id=req.request_id), layout=layout1,
                       events=events)
    except Exception:
        t.join()
        if "err" in box:
            raise RuntimeError(f"stage 0 failed: {box['err']}") from box["err"]
        raise
    t.join()
    if "err" in box:
        raise RuntimeError(f"stage 0 failed: {box['err']}") from box["err"]
    return box["r0"], r1
