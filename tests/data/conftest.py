"""Fixtures for the data tests: tiny tokenizer files built in the test, and a small job config."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from torchtitan_like.config.job_config import JobConfig

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Packing documents into fixed windows wastes no tokens on padding.",
    "Naïve café owners serve crème brûlée — déjà vu! 日本語のテキスト",
    "the the the then there these those",
] * 4
TIKTOKEN_MERGES = [b"th", b"he", b"the", b" t", b" the", b"in", b"er"]


@pytest.fixture(scope="session")
def hf_tokenizer_file(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with <s>/</s> trained on a few sentences (no config file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(SENTENCES, trainer)
    path = tmp_path_factory.mktemp("hf_tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def tiktoken_file(tmp_path_factory) -> Path:
    """A Llama-3-format tokenizer.model: all 256 bytes as ranks 0..255, then a few merges."""
    tokens = [bytes([value]) for value in range(256)] + TIKTOKEN_MERGES
    lines = [f"{base64.b64encode(token).decode()} {rank}" for rank, token in enumerate(tokens)]
    path = tmp_path_factory.mktemp("tiktoken") / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    return path


def make_job_config(**training) -> JobConfig:
    """A JobConfig with small batches and sequences; keyword arguments override `[training]`."""
    config = JobConfig()
    config.training.seq_len = 64
    config.training.local_batch_size = 4
    for key, value in training.items():
        setattr(config.training, key, value)
    return config
