"""Greedy text decoding (``greedy_decode``), with the token step captured in one CUDA graph (``GraphDecoder``).

Eager decoding is host-bound: a token ran ≈ 430 kernels (28 layers of norms, routed GEMMs, QK-norm+RoPE,
attention, cache writes; profiled on one H200, 2026-12-07), and Python + Triton's launch path cost several times the
GPU work, so the GPU idles most of a token (numbers: benchmarks/RESULTS.md, decode). ≈ 170 of those kernels were the
cache write's index arithmetic, 6 per layer for the one page and slot every layer shares: the step now computes them
once (``token_slots``) and each layer only wrote K and V (``write_token_slots``, two scatters: 323 kernels a bf16
token on one H100, 2026-12-07); the QK-norm + RoPE kernel now stores them itself (``SlotSink``: 56 launches fewer a
token). Every launch of a step depends only on device state — the fed token, its RoPE position, the
cache slot it is written to, the cache length the attention reads — so the step is recorded once and replayed; the
host only reads the chosen token back (the one read text decoding needs). That read is taken one step behind the
GPU (``decode_ahead``): the replay of a one-step graph left the GPU idle while the host waited for the token, read
it and queued the next replay (graph replay 8.48 ms a bf16 token against 5.89 ms of kernels on that H100).

The graph runs the very kernels the eager step runs on the same numbers, so the tokens are the eager ones bit for
bit (``greedy_decode(..., use_graph=False)`` is the check). CUDA only; the CPU keeps the eager loop (and runs the
look-ahead's bookkeeping eagerly in the tests).
"""
from __future__ import annotations

import torch

from bagel_kernels import ExpertSegments, invariant_linear
from bagel_kernels.kv_layout import token_slots

from ..core.layers import LayerInputs, SlotSink, local_attention
from ..core.model import BagelModel
from ..runtime.graph_capture import capture
from .kv_cache import Context
from .prefill import TextBlock, prefill


class GraphDecoder:
    """Feeds one token per step into ``context``'s (forked) paged cache; after a step ``token`` holds the greedy
    choice, which the next step feeds.

    A step is launched (``launch``), its token copied back (``fetch``) and read (``result``) apart, so the next step
    can be on the GPU while the host reads this one's token (``greedy_decode``'s look-ahead): a launched step moves
    the device-side state (position, slot, the cache's seqlens) at once, the host mirrors (``cache.length``,
    ``rope_position``) when its token is read; ``take_back`` undoes a launched step whose token is not wanted.
    ``record`` (default: on CUDA) replays the step from a CUDA graph after an eager first step; without it every
    step runs eagerly (the CPU tests run the look-ahead that way)."""

    def __init__(self, model: BagelModel, context: Context, first_token: int, record: bool | None = None):
        cache = context.cache
        if cache.length == 0:
            raise ValueError("graph decoding continues a prefilled context; the cache is empty")
        dev = model.device
        self.model, self.cache = model, cache
        self.token = torch.full((1,), first_token, dtype=torch.long, device=dev)  # fed this step, then the next
        self.position = torch.full((1,), context.rope_position, dtype=torch.long, device=dev)
        self.slot = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        self.visible = torch.ones(1, dtype=torch.int32, device=dev)  # one text token sees its own key (and context)
        self.rope_position = context.rope_position
        cuda = dev.type == "cuda"
        self.record = cuda if record is None else record
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm = False
        self.in_flight = 0  # launched steps whose tokens the host has not read
        self._host = torch.empty(1, dtype=torch.long, pin_memory=True) if cuda else None
        self._copied: torch.cuda.Event | None = None
        if cuda:
            with torch.cuda.device(dev):
                self._copied = torch.cuda.Event()
        self._fetched: int | None = None

    def _step(self) -> None:
        """One token, device work only: embed, 28 layers (cache write at ``slot``), LM head, argmax, advance."""
        m = self.model
        x = m.language_model.model.embed_tokens(self.token)
        cos, sin = m._cos_sin(self.position)
        li = LayerInputs(routing=ExpertSegments.uniform(1, False), cos=cos, sin=sin, gen_mode=False, small_batch=True,
                         kernels=m.kernels)
        # the token's page and slot, once for all layers (in the graph: from the device-side ``slot``); each
        # layer's QK-norm + RoPE kernel writes its K and V there (SlotSink)
        pages, slots = token_slots(self.cache.block_table[0], self.slot, 1, self.cache.views[0].block_size)
        sink = SlotSink(self.cache.views, pages, slots)
        h = m._run_layers(x, li, local_attention(self.cache.segments(), 1, self.visible, options=m.kernels), sink)
        logits = invariant_linear(h, m.language_model.lm_head.weight, small_batch=True, options=m.kernels)
        self.token.copy_(logits[-1].float().argmax().view(1))
        self.position.add_(1)
        self.slot.add_(1)
        self.cache.seqlens.add_(1)  # the attention of the next step sees this token in the cache

    def has_room(self) -> bool:
        """Whether the cache has a slot for one more launched step."""
        return self.cache.length + self.in_flight < self.cache.capacity

    @torch.no_grad()
    def launch(self) -> None:
        """Queue one step: it feeds the device-side token into the cache and leaves the next greedy token there."""
        if not self.has_room():
            raise ValueError(f"KV cache full: {self.cache.length} tokens (+{self.in_flight} launched) fill its "
                             f"capacity {self.cache.capacity}")
        if not self._warm or not self.record:
            self._step()  # the first step runs eagerly: compiles every kernel and warms the allocator
            self._warm = True
        else:
            if self.graph is None:  # capture records the step without running it; the replay runs it
                self.graph = torch.cuda.CUDAGraph()
                capture(self.graph, self._step)
            self.graph.replay()
        self.in_flight += 1

    def fetch(self) -> None:
        """Start copying the newest launched step's token to the host (queued before any later launch, which
        overwrites the device-side token)."""
        if self._host is None:
            self._fetched = int(self.token)
        else:
            self._host.copy_(self.token, non_blocking=True)  # on the token's device's current stream
            self._copied.record(torch.cuda.current_stream(self.token.device))

    def result(self) -> int:
        """The fetched token (waiting for its copy), its step accepted: the host mirrors advance."""
        if self._host is not None:
            self._copied.synchronize()
            self._fetched = int(self._host[0])
        self.in_flight -= 1
        self.cache.length += 1  # host mirror of the device-side length (seqlens advanced in the step)
        self.rope_position += 1
        return self._fetched

    def take_back(self) -> None:
        """Undo the newest launched, unread step's device-side advance (its cache slot then lies past the
        length: unseen, and overwritten by whatever is written there next). The decoder's token is then that
        step's unwanted choice, so decoding ends here."""
        self.position.sub_(1)
        self.slot.sub_(1)
        self.cache.seqlens.sub_(1)
        self.in_flight -= 1

    @torch.no_grad()
    def step(self) -> int:
        """Advance one token; returns the next greedy token (reading it back is the step's one synchronization)."""
        self.launch()
        self.fetch()
        return self.result()


def decode_ahead(decoder: GraphDecoder, first: int, max_tokens: int, eos_id: int, on_token=None,
                 look_ahead: bool = True) -> list[int]:
    """``greedy_decode``'s loop with one step of look-ahead: the step that feeds token i+1 is launched before the
    host reads token i+1, so the GPU runs it while the host waits for, reads and hands out token i+1 and queues the
    next launch — instead of idling through that host time every token. If token i+1 ends the decoding (EOS, the
    token budget, a full cache), the look-ahead step is taken back (``GraphDecoder.take_back``): the cache and the
    tokens are the one-step loop's, bit for bit (the same steps, in the same order, on the same device state).
    ``look_ahead=False`` is that one-step loop: each step launched once the previous token is read."""
    if max_tokens <= 0:
        return []
    out = [first]
    if on_token is not None:
        on_token(0, first)
    cache = decoder.cache
    if first == eos_id or max_tokens <= 1 or cache.length >= cache.capacity:
        return out
    decoder.launch()
    decoder.fetch()
    while True:
        ahead = look_ahead and len(out) + 1 < max_tokens and decoder.has_room()  # token i+2 may be wanted
        if ahead:
            decoder.launch()
        tok = decoder.result()
        out.append(tok)
        if on_token is not None:
            on_token(len(out) - 1, tok)
        if tok == eos_id or len(out) == max_tokens or cache.length >= cache.capacity:
            if ahead:
                decoder.take_back()
            return out
        if not ahead:
            decoder.launch()
        decoder.fetch()


@torch.no_grad()
def greedy_decode(model: BagelModel, context: Context, last_hidden: torch.Tensor, max_tokens: int,
                  eos_id: int, on_token=None, use_graph: bool | None = None, look_ahead: bool = True) -> list[int]:
    """Greedy decoding that appends to the paged cache; stops at ``eos_id`` or ``max_tokens``.

    Reading the argmax back to pick the next token is the one host read per step that text decoding needs. On CUDA
    the token step is replayed from a CUDA graph (``GraphDecoder``; same kernels, same tokens), one step ahead of
    the host's reads (``decode_ahead``; ``look_ahead=False``: each step after the previous token is read), unless
    ``use_graph=False`` or ``model.kernels.decode_graph`` is off."""
    if use_graph is None:
        use_graph = model.device.type == "cuda" and model.kernels.decode_graph
    logits = invariant_linear(last_hidden, model.language_model.lm_head.weight, small_batch=True,
                              options=model.kernels)
    tok = int(logits[-1].float().argmax())
    if use_graph:
        return decode_ahead(GraphDecoder(model, context, tok), tok, max_tokens, eos_id, on_token, look_ahead)
    out: list[int] = []
    for i in range(max_tokens):
        out.append(tok)
        if on_token is not None:
            on_token(i, tok)
        if tok == eos_id or i == max_tokens - 1:
            break
        if context.cache.length >= context.cache.capacity:
            break
        context, h = prefill(model, [TextBlock([tok])], context=context, small_batch=True)
        logits = invariant_linear(h, model.language_model.lm_head.weight, small_batch=True,
                                  options=model.kernels)
        tok = int(logits[-1].float().argmax())
    return out
