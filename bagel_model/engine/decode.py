"""Greedy text decoding (``greedy_decode``), with the token step captured in one CUDA graph (``GraphDecoder``).

Eager decoding is host-bound: a token ran ≈ 430 kernels (28 layers of norms, routed GEMMs, QK-norm+RoPE,
attention, cache writes; profiled on one H200, 2026-12-07), and Python + Triton's launch path cost several times the
GPU work, so the GPU idles most of a token (numbers: benchmarks/RESULTS.md, decode). ≈ 170 of those kernels were the
cache write's index arithmetic, 6 per layer for the one page and slot every layer shares: the step now computes them
once (``token_slots``) and each layer only writes K and V (``write_token_slots``; not yet timed on a GPU). Every
launch of a step depends only on device state — the fed token, its RoPE position, the cache slot it is written to,
the cache length the attention reads — so the step is recorded once and replayed; the host only reads the chosen
token back (the one read text decoding needs).

The graph runs the very kernels the eager step runs on the same numbers, so the tokens are the eager ones bit for
bit (``greedy_decode(..., use_graph=False)`` is the check). CUDA only; the CPU keeps the eager loop.
"""
from __future__ import annotations

import torch

from bagel_kernels import ExpertSegments, invariant_linear
from bagel_kernels.kv_layout import token_slots, write_token_slots

from ..core.layers import LayerInputs, local_attention
from ..core.model import BagelModel
from .kv_cache import Context
from .prefill import TextBlock, prefill


class GraphDecoder:
    """Feeds one token per step into ``context``'s (forked) paged cache; after a step ``token`` holds the greedy
    choice, which the next step feeds."""

    def __init__(self, model: BagelModel, context: Context, first_token: int):
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
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm = False

    def _step(self) -> None:
        """One token, device work only: embed, 28 layers (cache write at ``slot``), LM head, argmax, advance."""
        m = self.model
        x = m.language_model.model.embed_tokens(self.token)
        cos, sin = m._cos_sin(self.position)
        li = LayerInputs(routing=ExpertSegments.uniform(1, False), cos=cos, sin=sin, gen_mode=False, small_batch=True,
                         kernels=m.kernels)
        # the token's page and slot, once for all layers (in the graph: from the device-side ``slot``)
        pages, slots = token_slots(self.cache.block_table[0], self.slot, 1, self.cache.views[0].block_size)

        def write(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            write_token_slots(self.cache.views[layer], pages, slots, k, v)

        h = m._run_layers(x, li, local_attention(self.cache.segments(), 1, self.visible, options=m.kernels), write)
        logits = invariant_linear(h, m.language_model.lm_head.weight, small_batch=True, options=m.kernels)
        self.token.copy_(logits[-1].float().argmax().view(1))
        self.position.add_(1)
        self.slot.add_(1)
        self.cache.seqlens.add_(1)  # the attention of the next step sees this token in the cache

    @torch.no_grad()
    def step(self) -> int:
        """Advance one token; returns the next greedy token (reading it back is the step's one synchronization)."""
        if self.cache.length >= self.cache.capacity:
            raise ValueError(f"KV cache full: {self.cache.length} tokens fill its capacity {self.cache.capacity}")
        if not self._warm:
            self._step()  # the first step runs eagerly: compiles every kernel and warms the allocator
            self._warm = True
        else:
            if self.graph is None:  # capture records the step without running it; the replay runs it
                torch.cuda.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._step()
            self.graph.replay()
        self.cache.length += 1  # host mirror of the device-side length (seqlens advanced in the step)
        self.rope_position += 1
        return int(self.token)


@torch.no_grad()
def greedy_decode(model: BagelModel, context: Context, last_hidden: torch.Tensor, max_tokens: int,
                  eos_id: int, on_token=None, use_graph: bool | None = None) -> list[int]:
    """Greedy decoding that appends to the paged cache; stops at ``eos_id`` or ``max_tokens``.

    Reading the argmax back to pick the next token is the one host read per step that text decoding needs. On CUDA
    the token step is replayed from a CUDA graph (``GraphDecoder``; same kernels, same tokens) unless
    ``use_graph=False`` or ``model.kernels.decode_graph`` is off."""
    if use_graph is None:
        use_graph = model.device.type == "cuda" and model.kernels.decode_graph
    out: list[int] = []
    logits = invariant_linear(last_hidden, model.language_model.lm_head.weight, small_batch=True,
                              options=model.kernels)
    tok = int(logits[-1].float().argmax())
    decoder = None
    for i in range(max_tokens):
        out.append(tok)
        if on_token is not None:
            on_token(i, tok)
        if tok == eos_id or i == max_tokens - 1:
            break
        if context.cache.length >= context.cache.capacity:
            break
        if use_graph:
            if decoder is None:
                decoder = GraphDecoder(model, context, tok)
            tok = decoder.step()
        else:
            context, h = prefill(model, [TextBlock([tok])], context=context, small_batch=True)
            logits = invariant_linear(h, model.language_model.lm_head.weight, small_batch=True,
                                      options=model.kernels)
            tok = int(logits[-1].float().argmax())
    return out
