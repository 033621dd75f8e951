"""`build_dataloader`: from the config's dataset settings to a resumable, rank-sharded loader.

corpus (builtin | local files | tokenized shards | Hugging Face) -> token stream (packing.py)
-> PackedSamples windows -> ShardedSampler (this rank's share, seeded order) -> StatefulDataLoader
yielding (inputs, labels) int64 tensors of shape (local_batch_size, seq_len).

Training loaders reshuffle every epoch and never stop; validation loaders walk the split once in
corpus order. `loader.state_dict()` / `load_state_dict()` resume the exact position, also under
another data-parallel degree (sampler.py: the global position is kept). Tokenized text
of the built-in corpus is cached per process, so building several loaders tokenizes it once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from torchtitan_like.data.builtin_corpus import load_builtin_documents
from torchtitan_like.data.packing import PackedSamples, TokenStream, collate_samples, encode_corpus
from torchtitan_like.data.sampler import ShardedSampler
from torchtitan_like.data.shards import check_token_shards, load_token_shards
from torchtitan_like.data.sources import (check_huggingface_path, iter_documents, iter_huggingface_documents,
                                          resolve_corpus_files)
from torchtitan_like.data.tokenizers import Tokenizer
from torchtitan_like.errors import DataError

SPLITS = ("train", "validation")


@dataclass(frozen=True)
class DatasetSettings:
    """The dataset keys that matter for one split, resolved from `[training]` or `[validation]`."""

    dataset: str
    path: str
    text_field: str
    local_batch_size: int
    seq_len: int
    seed: int
    split: str
    verify_checksums: bool = False

    @property
    def section(self) -> str:
        return "training" if self.split == "train" else "validation"

    def describe(self) -> str:
        if self.dataset == "builtin":
            return f"the built-in corpus ({self.split} split)"
        return f"{self.section}.dataset_path {self.path} ({self.dataset}, {self.split} split)"


def dataset_settings(job_config: Any, split: str) -> DatasetSettings:
    if split not in SPLITS:
        raise DataError(f'unknown data split "{split}"; expected one of {", ".join(SPLITS)}')
    training = job_config.training
    if split == "train":
        return DatasetSettings(training.dataset, training.dataset_path, training.dataset_text_field,
                               training.local_batch_size, training.seq_len, training.seed, split,
                               training.dataset_verify_checksums)
    validation = job_config.validation
    path = validation.dataset_path
    # A prepare-data folder records its validation split: default to the training folder. (Not for HF
    # datasets: a saved single-split dataset would then validate on the training documents.)
    if not path and validation.dataset == training.dataset == "tokenized":
        path = training.dataset_path
    seq_len = training.seq_len if validation.seq_len == -1 else validation.seq_len
    return DatasetSettings(validation.dataset, path, training.dataset_text_field,
                           validation.local_batch_size, seq_len, training.seed, split,
                           training.dataset_verify_checksums)


def check_dataset_paths(job_config: Any, tokenizer: Tokenizer | None = None, dp_world_size: int = 1) -> None:
    """Fail fast on a corpus path that does not exist; for a prepare-data folder, on everything its
    metadata tells without reading tokens (tokenizer, split, shard sizes, enough tokens for a batch;
    checksums when asked): cheap, so the trainer runs it before any process group exists. The
    built-in corpus is checked for enough tokens too: it ships with the package, and its cached
    tokens are the ones the loaders then use."""
    splits = ["train"] + (["validation"] if job_config.validation.enable else [])
    for split in splits:
        settings = dataset_settings(job_config, split)
        if settings.dataset == "builtin" and tokenizer is not None:
            check_enough_tokens(len(builtin_corpus_tokens(tokenizer, split)), settings, dp_world_size)
        elif settings.dataset == "local":
            resolve_corpus_files(settings.path)
        elif settings.dataset == "tokenized":
            _, shards = check_token_shards(settings.path, split, tokenizer, settings.verify_checksums)
            check_enough_tokens(sum(num_tokens for _, num_tokens in shards), settings, dp_world_size)
        elif settings.dataset == "huggingface":
            check_huggingface_path(settings.path)


@functools.lru_cache(maxsize=4)
def builtin_corpus_tokens(tokenizer: Tokenizer, split: str) -> np.ndarray:
    """The packed built-in corpus split; cached because tests and restarts build many loaders."""
    tokens = encode_corpus(tokenizer, load_builtin_documents(split))
    tokens.flags.writeable = False  # shared by every caller of the cache
    return tokens


def load_tokens(settings: DatasetSettings, tokenizer: Tokenizer) -> TokenStream:
    """The packed token stream of one split, whatever the source."""
    if settings.dataset == "builtin":
        return TokenStream([builtin_corpus_tokens(tokenizer, settings.split)])
    if not settings.path:
        raise DataError(f'{settings.section}.dataset = "{settings.dataset}" needs {settings.section}.dataset_path')
    if settings.dataset == "local":
        return TokenStream([encode_corpus(tokenizer, iter_documents(settings.path, settings.text_field))])
    if settings.dataset == "tokenized":
        return load_token_shards(settings.path, settings.split, tokenizer, settings.verify_checksums)
    if settings.dataset == "huggingface":
        documents = iter_huggingface_documents(settings.path, settings.text_field, settings.split)
        return TokenStream([encode_corpus(tokenizer, documents)])
    raise DataError(f'unknown {settings.section}.dataset "{settings.dataset}"; '
                    f"expected builtin, local, tokenized or huggingface")


def check_enough_tokens(num_tokens: int, settings: DatasetSettings, dp_world_size: int) -> None:
    # Training needs one sample per rank (batches may span epochs); validation needs a whole batch per
    # rank, since it runs one finite pass that drops the incomplete last batch.
    samples_per_rank = 1 if settings.split == "train" else settings.local_batch_size
    window = settings.seq_len + 1
    needed_tokens = samples_per_rank * dp_world_size * window
    if num_tokens < needed_tokens:
        raise DataError(
            f"{settings.describe()} has {num_tokens:,} tokens, too few: {dp_world_size} data-parallel "
            f"rank(s) x {samples_per_rank} sample(s) of seq_len + 1 = {window} tokens need at least "
            f"{needed_tokens:,}; use a larger corpus or a smaller {settings.section}.seq_len"
            + ("" if settings.split == "train" else " or validation.local_batch_size"))


def build_dataloader(job_config: Any, tokenizer: Tokenizer, dp_rank: int, dp_world_size: int,
                     split: str = "train") -> StatefulDataLoader:
    """The loader of this data-parallel rank for `split` ("train" reads [training], "validation" [validation])."""
    settings = dataset_settings(job_config, split)
    dataset = PackedSamples(load_tokens(settings, tokenizer), settings.seq_len)
    check_enough_tokens(dataset.num_tokens, settings, dp_world_size)
    is_train = split == "train"
    sampler = ShardedSampler(len(dataset), dp_rank, dp_world_size, seed=settings.seed,
                             shuffle=is_train, infinite=is_train, seq_len=settings.seq_len)
    # Its own generator: every iter(loader) draws a base seed, which would otherwise come from the
    # global torch RNG and shift a just-restored RNG state (and every validation pass another draw).
    generator = torch.Generator().manual_seed(settings.seed)
    return StatefulDataLoader(dataset, batch_size=settings.local_batch_size, sampler=sampler, drop_last=True,
                              num_workers=0, collate_fn=collate_samples, generator=generator)


def check_loader_state(loader: Any, state: Any) -> None:
    """DataError now for a saved loader `state` that `loader` cannot continue (another seq_len,
    corpus or seed). StatefulDataLoader applies a loaded state only at the next `iter()`, so without this the
    mistake surfaced after the trainer had logged the resume and rewritten the run's config.toml."""
    if not isinstance(state, dict):
        return
    sampler_state = (state.get("_sampler_iter_state") or {}).get("sampler_state")
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler_state, dict) and isinstance(sampler, ShardedSampler):
        sampler.check_state_dict(sampler_state)


def check_saved_position(job_config: Any, tokenizer: Tokenizer, state: Any) -> None:
    """`check_loader_state` of the training loader `job_config` builds, without building it: the
    start-up checks run it on a checkpoint's saved state before any process group exists. seq_len
    and seed are always compared; the corpus (its sample count) where that is known without reading
    it: the built-in corpus (tokenized once per process, as check_dataset_paths does) and a
    prepare-data folder (memory-mapped). Other corpora are compared when the checkpoint is loaded."""
    settings = dataset_settings(job_config, "train")
    num_samples = None
    if settings.dataset in ("builtin", "tokenized"):
        num_samples = len(PackedSamples(load_tokens(settings, tokenizer), settings.seq_len))
    # The sampler skips a setting that is None (here: an unknown sample count); rank and degree do
    # not enter the check.
    sampler = ShardedSampler(num_samples, 0, 1, seed=settings.seed, seq_len=settings.seq_len)
    check_loader_state(SimpleNamespace(sampler=sampler), state)
