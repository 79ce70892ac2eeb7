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

import torch

from bagel_kernels import token_alignment

from .decode import greedy_decode
from .denoise import SamplingParams, denoise, initial_noise
from .generation import GenerationResult, decode_latent, single_device_velocities, tensor_md5
from .kv_transfer import KVPayload, abort, extract, install, recv_payload, send_payload
from .model import BagelModel, BranchContext, make_gen_sequence
from .prefill import PrefilledContext, TextBlock, new_cache, prefill, vae_block, vit_block
from .tokenizer import BagelTokenizer

MODES = ("text2img", "img2img", "text2text", "img2text")
IMAGE_OUT, IMAGE_IN = ("text2img", "img2img"), ("img2img", "img2text")


@dataclass
class Request:
    mode: str
    prompt: str
    params: SamplingParams
    image: torch.Tensor | None = None  # (H, W, 3) uint8 input for img2img / img2text
    max_tokens: int = 0  # greedy decode budget of stage 0 (text outputs, or "thinking" before an image)
    request_id: str = "request-0"
    ignore_eos: bool = False  # decode all max_tokens (benchmarks, tests), as serving engines' ignore_eos

    def validate(self) -> "Request":
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; expected one of {MODES}")
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


def _image_contexts(model: BagelModel, tok: BagelTokenizer, req: Request, extra: int
                    ) -> tuple[dict[str, PrefilledContext], dict[str, str], tuple[int, int]]:
    text = TextBlock(tok.encode_prompt(req.prompt))
    if req.mode == "text2img":
        full, _ = prefill(model, [text], extra_capacity=extra)
        empty = PrefilledContext(new_cache(model, 1, "flash_attn"), 0)
        return {"full": full, "text": empty}, {"full": "full", "text": "text", "img": "full"}, \
            (req.params.height, req.params.width)
    vae, vit = vae_block(model, req.image, req.params.seed), vit_block(model, req.image)
    full, _ = prefill(model, [vae, vit, text], extra_capacity=extra)
    no_text, _ = prefill(model, [vae, vit])
    no_img, _ = prefill(model, [text])
    h, w = req.image.shape[:2]
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
        last = None
    else:
        blocks = ([vit_block(model, req.image)] if req.mode == "img2text" else []) + [TextBlock(tok.encode_prompt(req.prompt))]
        decode_ctx, last = prefill(model, blocks, extra_capacity=req.max_tokens)
        events.record("prefill_done")
    if req.max_tokens > 0:
        if last is None:  # image modes: "thinking" continues from the full context's last prompt token
            last = _last_hidden(model, decode_ctx, tok.special["bos_token_id"])
        result.text_ids = greedy_decode(model, decode_ctx, last, req.max_tokens, eos, on_token=on_token)
        result.text = tok.decode(result.text_ids)
    events.record("stage0_done")
    return result


def _last_hidden(model: BagelModel, ctx: PrefilledContext, bos: int) -> torch.Tensor:
    """Hidden state that predicts the first token after an image prompt: the prompt ends with <|im_end|>, so the
    continuation starts from a fresh <|im_start|> (BAGEL's assistant turn), appended to the full context."""
    _, h = prefill(model, [TextBlock([bos])], context=ctx)
    return h


@torch.no_grad()
def run_stage1(model: BagelModel, payload: KVPayload, contexts: dict[str, PrefilledContext] | None = None,
               layout: str = "flash_attn", events: EventLog | None = None, progress: bool = False
               ) -> GenerationResult:
    """Denoise against the payload's contexts (installed into a ``layout`` cache unless given) and decode."""
    events = events or EventLog()
    events.record("stage1_start")
    p = payload.params
    h, w = payload.image_shape
    if contexts is None:
        contexts = {n: install(model, c, layout) for n, c in payload.contexts.items()}
    branch_ctx = {b: _branch(contexts[c]) for b, c in payload.branches.items()}
    seq = make_gen_sequence(model.cfg, h, w, 1, token_alignment(model.device, model.kernels))
    fn = single_device_velocities(model, seq, branch_ctx)
    x0 = initial_noise(seq.n_latent, model.cfg.patch_latent_dim, p.seed).to(model.device)
    x = denoise(x0, p, fn, progress=progress, on_step=lambda i, t: events.record("dit_step") if i == 0 else None)
    image = decode_latent(model, x, seq)
    events.record("stage1_done")
    return GenerationResult(x, image, tensor_md5(x), tensor_md5(image), p)


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
        r1 = run_stage1(model1, recv_payload(connector), layout=layout1, events=events)
    except Exception:
        t.join()
        if "err" in box:
            raise RuntimeError(f"stage 0 failed: {box['err']}") from box["err"]
        raise
    t.join()
    if "err" in box:
        raise RuntimeError(f"stage 0 failed: {box['err']}") from box["err"]
    return box["r0"], r1
