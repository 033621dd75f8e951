"""Llama 3's `tokenizer.model`: a tiktoken BPE file plus Llama 3's special tokens and split regex.

The file holds one `base64(token bytes) rank` pair per line. Llama 3 appends 256 special tokens
after the highest rank, so with the official 128,000 ranks `<|begin_of_text|>` is 128000,
`<|end_of_text|>` 128001 and the vocabulary 128,256 (the list below is Llama 3.1's, from Meta's
`llama_models/llama3/tokenizer.py`). The file is parsed here rather than by `tiktoken.load`, which
caches files in a temp folder and may fetch URLs; we only ever read a local path.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Iterator, Sequence

from torchtitan_like.data.tokenizers import Tokenizer
from torchtitan_like.errors import DataError

NUM_SPECIAL_TOKENS = 256
_NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
]
LLAMA3_SPECIAL_TOKENS = _NAMED_SPECIAL_TOKENS + [
    f"<|reserved_special_token_{index}|>" for index in range(2, NUM_SPECIAL_TOKENS - len(_NAMED_SPECIAL_TOKENS) + 2)
]
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tiktoken's regex engine recurses per character of a run; Meta cuts inputs so that very long texts
# and very long whitespace/non-whitespace runs cannot overflow its stack.
MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACE_CHARS = 25_000
_LONG_RUN = re.compile(rf"\s{{{MAX_NO_WHITESPACE_CHARS + 1},}}|\S{{{MAX_NO_WHITESPACE_CHARS + 1},}}")


def read_bpe_ranks(path: str) -> dict[bytes, int]:
    """Parse `base64 rank` lines; a malformed line is a DataError naming the file and line."""
    try:
        lines = open(path, "rb").read().splitlines()
    except OSError as error:
        raise DataError(f"cannot read tiktoken file {path}: {error}") from error
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error) as error:
            raise DataError(f"{path}:{line_number}: expected 'base64-token rank' as in Llama 3's "
                            f"tokenizer.model, got {line[:60]!r}") from error
    if not ranks:
        raise DataError(f"tiktoken file {path} holds no tokens; expected 'base64-token rank' lines")
    return ranks


class TiktokenTokenizer(Tokenizer):
    kind = "tiktoken"

    def __init__(self, path: str):
        try:
            import tiktoken
        except ImportError as error:
            raise DataError(f"reading {path} needs the `tiktoken` package: pip install tiktoken") from error
        self.path = path
        ranks = read_bpe_ranks(path)
        first_special = max(ranks.values()) + 1
        self.special_tokens = {token: first_special + index for index, token in enumerate(LLAMA3_SPECIAL_TOKENS)}
        try:
            self._encoding = tiktoken.Encoding(name=path, pat_str=LLAMA3_SPLIT_PATTERN,
                                               mergeable_ranks=ranks, special_tokens=self.special_tokens)
        except ValueError as error:
            raise DataError(f"{path} is not a valid tiktoken BPE file: {error}") from error
        self._vocab_size = first_special + NUM_SPECIAL_TOKENS

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self.special_tokens["<|begin_of_text|>"]

    @property
    def eos_id(self) -> int:
        return self.special_tokens["<|end_of_text|>"]

    def encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _safe_pieces(text):
            ids += self._encoding.encode_ordinary(piece)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ordinary tokens; special tokens (BOS, EOS, ...) are dropped, as the other
        tokenizers do."""
        first_special = min(self.special_tokens.values())
        return self._encoding.decode([int(i) for i in ids if int(i) < first_special])


def _safe_pieces(text: str) -> Iterator[str]:
    """Cut text as Llama 3's reference does: 400k-char chunks, then runs of at most 25k chars
    without a change between whitespace and non-whitespace."""
    for start in range(0, len(text), MAX_ENCODE_CHARS):
        yield from _split_long_runs(text[start:start + MAX_ENCODE_CHARS])


def _split_long_runs(text: str) -> Iterator[str]:
    piece_start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_NO_WHITESPACE_CHARS, run.end(), MAX_NO_WHITESPACE_CHARS):
            yield text[piece_start:cut]
            piece_start = cut
    yield text[piece_start:]
