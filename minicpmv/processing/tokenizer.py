"""The checkpoint's `tokenizer.json`, loaded with the `tokenizers` library, plus the named special tokens."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from minicpmv.errors import CheckpointError, InvalidInputError


IM_START = "<|im_start|>"
DEFAULT_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>")


@dataclass(frozen=True)
class MediaTokens:
    """Token strings the processor writes around visual features (`extra_special_tokens` in tokenizer_config)."""

    image: str = "<|image_pad|>"
    video: str = "<|video_pad|>"
    image_start: str = "<image>"
    image_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    image_id_start: str = "<image_id>"
    image_id_end: str = "</image_id>"

    @classmethod
    def from_config(cls, config: dict) -> MediaTokens:
        extra = config.get("extra_special_tokens") or {}
        if not isinstance(extra, dict):  # older configs list the tokens instead of naming them
            extra = {}
        names = {f"{field}_token": field for field in cls.__dataclass_fields__}
        return cls(**{names[key]: value for key, value in {**config, **extra}.items() if key in names})


class TextTokenizer:
    def __init__(self, tokenizer: Tokenizer, config: dict):
        self.backend = tokenizer
        self.config = config
        self.media = MediaTokens.from_config(config)
        self.special_tokens = {
            name: config[name] for name in ("bos_token", "eos_token", "pad_token", "unk_token") if config.get(name)
        }
        for token in (*self.special_tokens.values(), *vars(self.media).values()):
            self.token_to_id(token)  # fail early if the tokenizer lacks one

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> TextTokenizer:
        directory = Path(directory)
        try:
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on missing or malformed files
            raise CheckpointError(f"cannot load {directory / 'tokenizer.json'}: {e}") from e
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {directory / 'tokenizer_config.json'}: {e}") from e
        return cls(tokenizer, config)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids with no BOS/EOS added (the chat template writes every control token itself)."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud800": the backend would raise a TypeError
            raise InvalidInputError(f"the text is not valid Unicode: {e.object[e.start:e.end]!r} at character {e.start}") from None
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no token {token!r}")
        return token_id

    @property
    def eos_token_id(self) -> int:
        return self.token_to_id(self.special_tokens["eos_token"])

    @property
    def im_start_id(self) -> int:
        """``<|im_start|>``: where each turn of the chat template begins."""
        return self.token_to_id(IM_START)

    @property
    def default_stop_ids(self) -> list[int]:
        """What ends an answer when the checkpoint's generation config says nothing: ``<|endoftext|>``, ``<|im_end|>``."""
        return [self.token_to_id(t) for t in DEFAULT_STOP_TOKENS]
