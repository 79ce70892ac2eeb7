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
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        ids = {}
        for key, text in SPECIAL_TOKENS.items():
            tid = tokenizer.token_to_id(text)
            if tid is None:
                raise ValueError(f"tokenizer lacks the special token {text!r} BAGEL needs ({key})")
            ids[key] = tid
        self.special = ids

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
        return [self.special["bos_token_id"], *self.encode(text), self.special["eos_token_id"]]
