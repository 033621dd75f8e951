"""Hugging Face `tokenizer.json` files, read with the `tokenizers` package (a Rust BPE/Unigram engine).

BOS/EOS come from `tokenizer_config.json` beside the file (`bos_token`/`eos_token`, a string or a
`{"content": ...}` record) when present, else from the first well-known special-token name found in
the vocabulary. Ids are added by `Tokenizer.encode`, never by the file's post-processor, so every
tokenizer frames documents the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from torchtitan_like.data.tokenizers import Tokenizer
from torchtitan_like.errors import DataError

# Llama 3, Llama 2 / Mistral, GPT-2 / Qwen, Gemma, in that order of preference.
COMMON_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<|endoftext|>", "<bos>")
COMMON_EOS_TOKENS = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|im_end|>")
ENCODE_BATCH_SIZE = 1024


class HFTokenizer(Tokenizer):
    kind = "hf"

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError as error:
            raise DataError(f"reading {path} needs the `tokenizers` package: pip install tokenizers") from error
        self.path = path
        try:
            self._tokenizer = RustTokenizer.from_file(path)
        except Exception as error:  # the Rust side raises a bare Exception with its parse message
            raise DataError(f"{path} is not a readable Hugging Face tokenizer.json: {error}") from error
        # Special-token text inside a document ("</s>", "<|end_of_text|>") is plain text, as
        # encode_ordinary promises: add_special_tokens=False alone still matches added tokens.
        if not hasattr(self._tokenizer, "encode_special_tokens"):
            raise DataError(f"reading {path} needs tokenizers >= 0.15 (encode_special_tokens): pip install -U tokenizers")
        self._tokenizer.encode_special_tokens = True
        # One past the highest id, not the number of tokens (get_vocab_size): a vocabulary with unused
        # ids would otherwise give an embedding too small for its ids and a uint16 shard dtype that wraps them.
        self._vocab_size = max(self._tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        config = _read_tokenizer_config(Path(path).with_name("tokenizer_config.json"))
        self._bos_id = self._special_id("bos", config.get("bos_token"), COMMON_BOS_TOKENS)
        self._eos_id = self._special_id("eos", config.get("eos_token"), COMMON_EOS_TOKENS)

    def _special_id(self, role: str, configured: object, common_names: tuple[str, ...]) -> int:
        if isinstance(configured, dict):
            configured = configured.get("content")
        if isinstance(configured, str) and configured:
            token_id = self._tokenizer.token_to_id(configured)
            if token_id is None:
                raise DataError(f'tokenizer_config.json beside {self.path} names {role}_token "{configured}", '
                                f"which is not in the vocabulary")
            return token_id
        for name in common_names:
            token_id = self._tokenizer.token_to_id(name)
            if token_id is not None:
                return token_id
        raise DataError(f"cannot find the {role.upper()} token of {self.path}: add a tokenizer_config.json beside "
                        f'it with "{role}_token", or use a vocabulary holding one of {", ".join(common_names)}')

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode_ordinary(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch_ordinary(self, texts: Sequence[str]) -> list[list[int]]:
        ids: list[list[int]] = []
        for start in range(0, len(texts), ENCODE_BATCH_SIZE):
            batch = self._tokenizer.encode_batch(list(texts[start:start + ENCODE_BATCH_SIZE]),
                                                 add_special_tokens=False)
            ids += [encoding.ids for encoding in batch]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{path} is not readable JSON: {error}") from error
    return config if isinstance(config, dict) else {}
