"""Packing: documents become one token stream, cut into fixed-length training samples.

Each document is framed as BOS + ids + EOS and the frames are concatenated, so attention sees
document boundaries through the BOS/EOS tokens rather than through padding (no token is wasted).
The stream is cut into non-overlapping windows of `seq_len + 1` tokens; a window gives
`inputs = window[:-1]` and `labels = window[1:]` (next-token prediction). The tail shorter than one
window is dropped.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from torchtitan_like.data.tokenizers import Tokenizer

ENCODE_CHUNK_DOCUMENTS = 512


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id below `vocab_size`: uint16 up to 65,536 ids."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode_corpus(tokenizer: Tokenizer, documents: Iterable[str]) -> np.ndarray:
    """The packed stream of `documents` (BOS + ids + EOS each) in the tokenizer's smallest dtype."""
    dtype = token_dtype(tokenizer.vocab_size)
    pieces, chunk = [], []
    for document in documents:
        chunk.append(document)
        if len(chunk) == ENCODE_CHUNK_DOCUMENTS:
            pieces.append(tokenizer.encode_documents(chunk).astype(dtype))
            chunk = []
    if chunk:
        pieces.append(tokenizer.encode_documents(chunk).astype(dtype))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)


class TokenStream:
    """Several token arrays (in-memory arrays or memory-mapped shards) read as one sequence."""

    def __init__(self, arrays: Sequence[np.ndarray]):
        self.arrays = [array for array in arrays if len(array)]
        self.offsets = np.cumsum([0] + [len(array) for array in self.arrays])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) as int64, copied out of the (possibly memory-mapped) arrays."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens [{start}, {stop}) outside a stream of {len(self)}")
        first = int(np.searchsorted(self.offsets, start, side="right")) - 1
        pieces, position = [], start
        for index in range(first, len(self.arrays)):
            if position >= stop:
                break
            local_start = position - int(self.offsets[index])
            local_stop = min(stop, int(self.offsets[index + 1])) - int(self.offsets[index])
            pieces.append(self.arrays[index][local_start:local_stop])
            position = int(self.offsets[index]) + local_stop
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)


class PackedSamples(Dataset):
    """Map-style dataset: sample i is window i of `seq_len + 1` tokens, as (inputs, labels) int64 tensors."""

    def __init__(self, tokens: TokenStream | np.ndarray, seq_len: int):
        self.tokens = tokens if isinstance(tokens, TokenStream) else TokenStream([tokens])
        self.seq_len = seq_len
        self.window = seq_len + 1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens) // self.window

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} outside {len(self)} packed samples")
        window = torch.from_numpy(self.tokens.read(index * self.window, (index + 1) * self.window))
        return window[:-1], window[1:]


def collate_samples(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples into (inputs, labels) of shape (batch, seq_len); a module-level function so
    worker processes can pickle it."""
    inputs, labels = zip(*samples)
    return torch.stack(inputs), torch.stack(labels)
