"""Tokenizer: the checkpoint's ``tokenizer.json`` when present, else a built-in byte-level one for ``tiny``.

Both are ``tokenizers.Tokenizer`` objects, so saving and loading go through one code path and no download is needed.
"""
from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# BAGEL's new_token_ids: bos/eos are the chat markers, images are wrapped in vision markers.
SPECIAL_TOKENS = {
    "bos_token_id": "<|im_start|>",
    "eos_token_id": "<|im_end|>",
    "start_of_image": "<|vision_start|>",
    "end_of_image": "<|vision_end|>",
}
TINY_VOCAB_SIZE = 272  # 256 bytes + specials, rounded up


def build_tiny_tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()) + ["<|endoftext|>"])
    return tok


class BagelTokenizer:
    def __init__(self, tokenizer: Tokenizer, special_ids: dict[str, int] | None = None):
        """``special_ids`` overrides the ids of BAGEL's special tokens (``SPECIAL_TOKENS`` keys), for a checkpoint
        whose vocabulary places them elsewhere than ``tokenizer`` does (prompts then given as token ids)."""
        self.tokenizer = tokenizer
        ids = {}
        for key, text in SPECIAL_TOKENS.items():
            tid = tokenizer.token_to_id(text) if special_ids is None or key not in special_ids else special_ids[key]
            if tid is None:
                raise ValueError(f"tokenizer lacks the special token {text!r} BAGEL needs ({key})")
            ids[key] = int(tid)
        if special_ids is not None:
            unknown = sorted(set(special_ids) - set(SPECIAL_TOKENS))
            if unknown:
                raise ValueError(f"unknown special token names {unknown}; expected some of {sorted(SPECIAL_TOKENS)}")
        self.special = ids

    def with_special_ids(self, special_ids: dict[str, int]) -> "BagelTokenizer":
        """The same tokenizer with BAGEL's special-token ids taken from ``special_ids`` (e.g. a checkpoint's
        ``new_token_ids`` when it ships no tokenizer files)."""
        return BagelTokenizer(self.tokenizer, {**self.special, **special_ids})

    @staticmethod
    def from_directory(directory: str | None, byte_fallback: bool = False) -> "BagelTokenizer":
        """The directory's ``tokenizer.json``; the built-in byte-level tokenizer for ``None`` (presets), or for a
        directory without one only when ``byte_fallback`` opts in: with a real checkpoint, byte tokens are wrong
        tokens, and nothing downstream would notice."""
        if directory is not None:
            path = os.path.join(directory, "tokenizer.json")
            if os.path.isfile(path):
                try:
                    return BagelTokenizer(Tokenizer.from_file(path))
                except Exception as e:  # noqa: BLE001 - the tokenizers library's errors do not name the file
                    raise ValueError(f"{path} is not a valid tokenizer file: {e}") from None
            if not byte_fallback:
                raise FileNotFoundError(f"{path} is missing: a checkpoint needs its tokenizer (pass --byte-tokenizer "
                                        "/ byte_tokenizer=True only for checkpoints trained with the built-in "
                                        "byte-level one)")
        return BagelTokenizer(build_tiny_tokenizer())

    def save(self, directory: str) -> None:
        self.tokenizer.save(os.path.join(directory, "tokenizer.json"))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def encode_prompt(self, text: str) -> list[int]:
        """``[bos] + text + [eos]`` as BAGEL's prepare_prompts builds it; an empty prompt is an error."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("prompt is empty: give a non-empty text prompt")
        return self.wrap_prompt_ids(self.encode(text))

    def wrap_prompt_ids(self, ids: list[int], vocab_size: int | None = None) -> list[int]:
        """A prompt given as token ids (no chat markers) -> ``[bos] + ids + [eos]``, as ``encode_prompt`` does for
        text. ``vocab_size`` (the model's) bounds the ids: an out-of-range id is an error, not an index fault."""
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("prompt_ids is empty: give at least one token id")
        bad = [i for i in ids if i < 0 or (vocab_size is not None and i >= vocab_size)]
        if bad:
            raise ValueError(f"prompt ids {bad[:8]} are outside the vocabulary [0, {vocab_size})")
        return [self.special["bos_token_id"], *ids, self.special["eos_token_id"]]
