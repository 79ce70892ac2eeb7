"""BAGEL as two stages: stage 0 (AR: packed prefill of the CFG contexts, optional greedy decode) and stage 1 (DiT:
denoise against the transferred KV, VAE decode). Single-stage runs both in one process without a connector; split
runs hand the KV over through a connector the moment it exists ("KV ready") — stage 0's decode goes on in parallel.

Modes: text2img, img2img (image editing), text2text, img2text. Context layout per mode (docs/DESIGN.md §1, §6):
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

from ..core.model import BagelModel
from ..core.sampling import SamplingParams
from ..core.tokenizer import BagelTokenizer
from ..core.transforms import vae_resize_rule
from ..engine.decode import greedy_decode
from ..engine.denoise import DenoiseRequest, denoise
from ..engine.kv_cache import Context, empty_context
from ..engine.output import GenerationResult, decode_latent, tensor_md5
from ..engine.prefill import TextBlock, prefill, vae_block, vit_block
from ..engine.step import PackedStep
from .payload import KVPayload, check_branch_map, extract, install
from .connectors import abort, recv_payload, send_payload

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
class DiffusionInput:
    """What stage 1 needs of an image request: its parameters, its output size and each CFG branch's context.
    Branches that share one ``Context`` object ("img" = "full" in text-to-image) are one job of the packed step."""

    params: SamplingParams
    image_shape: tuple[int, int]
    contexts: dict[str, Context]  # CFG branch ("full", "text", "img") -> context
    request_id: str = "request-0"

    def start(self, model: BagelModel) -> DenoiseRequest:
        """The request at its first denoise step: latent grid and seeded noise on the model's device."""
        return DenoiseRequest.start(model.cfg, self.params, self.contexts, model.device, size=self.image_shape)


def to_payload(inp: DiffusionInput, mode: str) -> KVPayload:
    """The transfer payload of a stage-0 result: each distinct context once, named by the first branch using it."""
    names: dict[int, str] = {}  # context object -> the first branch using it
    for b, c in inp.contexts.items():
        names.setdefault(id(c), b)
    return KVPayload(inp.request_id, mode, inp.params, inp.image_shape,
                     {n: extract(inp.contexts[n]) for n in names.values()},
                     {b: names[id(c)] for b, c in inp.contexts.items()})


def from_payload(model: BagelModel, payload: KVPayload, layout: str = "flash_attn") -> DiffusionInput:
    """A received payload installed into ``layout`` caches on the model's device; branches naming one stored
    context share one ``Context``."""
    check_branch_map(payload)  # also where the payload was never validated (validate_payload checks it too)
    installed = {n: install(model, c, layout) for n, c in payload.contexts.items()}
    return DiffusionInput(payload.params, tuple(payload.image_shape),
                          {b: installed[n] for b, n in payload.branches.items()}, payload.request_id)


@dataclass
class Stage0Result:
    diffusion: DiffusionInput | None = None  # image modes: what stage 1 denoises against
    payload: KVPayload | None = None  # the transfer payload, made only when it was sent
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


def prepare_image(model: BagelModel, tok: BagelTokenizer, req: Request, extra_capacity: int = 0) -> DiffusionInput:
    """Prefill an image request's CFG contexts (paged; ``extra_capacity`` tokens of room in the full one for
    decoding): text2img full = [prompt], no-text = empty, no-image = full; img2img full = [VAE, ViT, prompt],
    no-text = [VAE, ViT], no-image = [prompt] (docs/DESIGN.md §1)."""
    text = prompt_block(model, tok, req)
    if req.mode == "text2img":
        full, _ = prefill(model, [text], extra_capacity=extra_capacity)
        return DiffusionInput(req.params, (req.params.height, req.params.width),
                              {"full": full, "text": empty_context(model), "img": full}, req.request_id)
    image = input_image(model, req)
    vae, vit = vae_block(model, image, req.params.seed), vit_block(model, image)
    full, _ = prefill(model, [vae, vit, text], extra_capacity=extra_capacity)
    no_text, _ = prefill(model, [vae, vit])
    no_img, _ = prefill(model, [text])
    return DiffusionInput(req.params, tuple(image.shape[:2]), {"full": full, "text": no_text, "img": no_img},
                          req.request_id)


@torch.no_grad()
def run_stage0(model: BagelModel, tok: BagelTokenizer, req: Request, send=None, events: EventLog | None = None,
               on_token=None) -> Stage0Result:
    """Prefill the request's contexts; for image outputs, when ``send`` is given (a split run), build the KV payload
    and send it at once (KV ready); then decode up to ``max_tokens`` greedily. ``send`` takes the ``KVPayload``
    (e.g. ``partial(send_payload, connector)``); without it (one process) no payload is made: stage 1 reads the
    contexts in ``Stage0Result.diffusion`` as they are."""
    req.validate()
    events = events or EventLog()
    events.record("stage0_start")
    eos = -1 if req.ignore_eos else tok.special["eos_token_id"]
    result = Stage0Result()
    if req.mode in IMAGE_OUT:
        result.diffusion = prepare_image(model, tok, req, req.max_tokens)
        events.record("kv_ready")
        if send is not None:
            result.payload = to_payload(result.diffusion, req.mode)
            send(result.payload)
            events.record("kv_forwarded")
        # decode appends to a fork: the contexts handed to stage 1 keep exactly the prefill KV
        decode_ctx = result.diffusion.contexts["full"].fork()
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


def _start_answer(model: BagelModel, ctx: Context, bos: int) -> tuple[Context, torch.Tensor]:
    """The context and hidden state that predict the first answer token. The prompt ends with <|im_end|>; as
    upstream's ``prepare_start_tokens``/``generate_text`` do, the answer turn starts from <|im_start|> fed at the
    next position (appended to ``ctx``); decoding continues from its row and from the position after it."""
    return prefill(model, [TextBlock([bos])], context=ctx)


@torch.no_grad()
def run_stage1(model: BagelModel, payload: KVPayload, layout: str = "flash_attn", events: EventLog | None = None,
               progress: bool = False, engine=None) -> GenerationResult:
    """Denoise against a received payload's contexts (installed into ``layout`` caches) and decode."""
    return run_stage1_batch(model, [from_payload(model, payload, layout)], events, progress, engine)[0]


@torch.no_grad()
def run_stage1_batch(model: BagelModel, inputs: list[DiffusionInput], events: EventLog | None = None,
                     progress: bool = False, engine=None,
                     on_step: Callable[[int, int, float, torch.Tensor], torch.Tensor | None] | None = None
                     ) -> list[GenerationResult]:
    """Denoise several requests together — every step's CFG jobs of all of them in one packed forward
    (``engine.step.PackedStep`` unless ``engine`` is given) — and decode each. Each result is bit-identical to
    the request's run alone. ``on_step(input_index, step, t, x)`` is ``denoise``'s per-request step hook."""
    events = events or EventLog()
    events.record("stage1_start")
    reqs = [inp.start(model) for inp in inputs]
    engine = engine if engine is not None else PackedStep(model)
    first = [True]

    def step_hook(i: int, k: int, t: float, x: torch.Tensor) -> torch.Tensor | None:
        if first[0]:
            events.record("dit_step")
            first[0] = False
        return on_step(i, k, t, x) if on_step is not None else None

    xs = denoise(reqs, engine, progress=progress, on_step=step_hook)
    out = []
    for inp, r, x in zip(inputs, reqs, xs):
        image = decode_latent(model, x, r.grid)
        out.append(GenerationResult(x, image, tensor_md5(x), tensor_md5(image), inp.params, r.cache_stats()))
    events.record("stage1_done")
    return out


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
