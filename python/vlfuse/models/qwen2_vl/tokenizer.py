"""Tokenizers: the checkpoint's Qwen2 ``tokenizer.json`` (through the ``tokenizers`` library) or a built-in
byte-level character tokenizer with the same special tokens, for offline use and the ``tiny`` preset."""

from __future__ import annotations

import os
import re

from .config import CHAR_VOCAB_SPECIALS, Qwen2VLConfig

__all__ = ["CharTokenizer", "HFTokenizer", "load_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = tuple(CHAR_VOCAB_SPECIALS)


class CharTokenizer:
    """Bytes of the UTF-8 text are tokens 0..255; the special tokens (``<|im_start|>``, ``<|image_pad|>``, ...)
    are single tokens with the ids given (by default those of ``CHAR_VOCAB_SPECIALS``, the ``tiny`` preset's)."""

    def __init__(self, special_tokens: dict[str, int] | None = None) -> None:
        self.special_tokens = dict(CHAR_VOCAB_SPECIALS if special_tokens is None else special_tokens)
        clash = [t for t, i in self.special_tokens.items() if 0 <= i < 256]
        if clash:
            raise ValueError(f"special token ids must not collide with the 256 byte ids: {clash}")
        self._by_id = {i: t for t, i in self.special_tokens.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self.vocab_size = max(self._by_id) + 1

    @classmethod
    def for_config(cls, config: Qwen2VLConfig) -> "CharTokenizer":
        """The special tokens at the config's ids (vision tokens, bos, eos); the others keep their default ids."""
        specials = dict(CHAR_VOCAB_SPECIALS)
        specials.update(
            {
                "<|vision_start|>": config.vision_start_token_id,
                "<|vision_end|>": config.vision_end_token_id,
                "<|image_pad|>": config.image_token_id,
                "<|video_pad|>": config.video_token_id,
                "<|endoftext|>": config.bos_token_id,
                "<|im_end|>": config.eos_token_id,
            }
        )
        return cls(specials)

    def token_to_id(self, token: str) -> int | None:
        return self.special_tokens.get(token)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.special_tokens:
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(piece.encode("utf-8"))
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        out = bytearray()
        for i in (int(i) for i in ids):
            if i < 256:
                out.append(i)
            elif not skip_special_tokens and i in self._by_id:
                out.extend(self._by_id[i].encode("utf-8"))
        return out.decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` (Qwen2's byte-level BPE with its added special tokens) loaded with ``tokenizers``."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers ships with the test extras
            raise ImportError("vlfuse: reading tokenizer.json needs the `tokenizers` package") from exc
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def load_tokenizer(folder: str | os.PathLike | None, config: Qwen2VLConfig):
    """``folder/tokenizer.json`` when present, else the character tokenizer at the config's special ids."""
    if folder is not None:
        path = os.path.join(folder, "tokenizer.json")
        if os.path.isfile(path):
            return HFTokenizer(path)
    tokenizer = CharTokenizer.for_config(config)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the built-in character tokenizer needs ids up to {tokenizer.vocab_size - 1} but the model's vocabulary "
            f"has {config.vocab_size}; put the checkpoint's tokenizer.json in the model folder"
        )
    return tokenizer
