"""A resumable sampler that shards packed samples across data-parallel ranks.

Epoch e visits a permutation of all sample indices drawn from a generator seeded with (seed, e), so
the same seed gives the same order on every run and each epoch is reshuffled. The permutation is
trimmed to a multiple of the world size (the few leftover samples differ per epoch) and rank r takes
positions r, r + world, r + 2 world, ...: ranks are disjoint and together cover every kept sample.

`state_dict()` is (epoch, samples yielded in the epoch). torchdata's StatefulDataLoader stores it
through its batch sampler and, on `load_state_dict`, restarts iteration exactly there: a resumed run
sees the very batches an uninterrupted run would have seen.

Resharding (a checkpoint of W data-parallel ranks loaded by W' ranks). The permutation of an epoch
depends on (seed, epoch) only, and rank r reads positions r, r + W, ...: once every rank has read y
samples of the epoch, the ranks together have read exactly the first W * y positions of that
permutation, whatever W. The state therefore also stores this global count (`consumed_in_epoch`), and
a run with W' ranks resumes every rank at `consumed_in_epoch // W'` of the same epoch. With the same
global batch (local batch x W), the W' ranks' next batches are then, together, the same block of the
permutation the W ranks would have read.

The rule at the epoch boundary: the resumed run trims the epoch its own way, ending it after
W' * (N // W') of its N samples instead of W * (N // W) (a resumed position past that end starts the
next epoch). Both runs read the same samples up to the smaller of the two ends; the batch crossing
the boundary, and so every later one, can differ when N % W != N % W' (the at most max(W, W') - 1
trimmed samples at the end of the epoch are read by one run and not the other), and from the next
epoch on the run is an ordinary W'-rank run. A count not divisible by W' (only when the global batch
changed) is rounded down: fewer than W' samples are read again, none is skipped.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler

from torchtitan_like.errors import DataError


class ShardedSampler(Sampler[int]):
    """Indices of this rank's samples; infinite (epoch after epoch) or a single pass."""

    def __init__(self, num_samples: int, dp_rank: int, dp_world_size: int, *, seed: int = 0,
                 shuffle: bool = True, infinite: bool = True, seq_len: int | None = None):
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} outside a data-parallel world of {dp_world_size}")
        self.num_samples = num_samples
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.seed = seed
        self.shuffle = shuffle
        self.infinite = infinite
        self.seq_len = seq_len  # recorded in the state, so a relaunch with another one is named as such
        self.epoch = 0
        self.yielded_in_epoch = 0

    @property
    def samples_per_rank(self) -> int:
        return self.num_samples // self.dp_world_size

    def __len__(self) -> int:
        return self.samples_per_rank

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """This rank's sample indices for `epoch`, in visiting order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        kept = order[: self.samples_per_rank * self.dp_world_size]
        return kept[self.dp_rank :: self.dp_world_size]

    def __iter__(self) -> Iterator[int]:
        while True:
            indices = self.epoch_indices(self.epoch)
            while self.yielded_in_epoch < len(indices):
                index = int(indices[self.yielded_in_epoch])
                self.yielded_in_epoch += 1
                yield index
            self.epoch += 1
            self.yielded_in_epoch = 0
            if not self.infinite or len(indices) == 0:
                return

    def restart(self) -> None:
        """Back to the start of epoch 0 (validation scores the same batches at every evaluation)."""
        self.epoch, self.yielded_in_epoch = 0, 0

    def state_dict(self) -> dict[str, Any]:
        state = {"epoch": self.epoch, "yielded_in_epoch": self.yielded_in_epoch,
                 "consumed_in_epoch": self.yielded_in_epoch * self.dp_world_size, "seed": self.seed,
                 "num_samples": self.num_samples, "dp_world_size": self.dp_world_size}
        if self.seq_len is not None:
            state["seq_len"] = self.seq_len
        return state

    def check_state_dict(self, state_dict: dict[str, Any]) -> None:
        """DataError for a saved state of another sample length, corpus or seed: it would silently
        replay other data. Samples are windows of seq_len + 1 tokens in a permutation drawn from the
        seed, so neither a position nor an order carries over to another length, corpus or seed."""
        # seq_len first: another length changes num_samples too (states saved before it was recorded
        # hold no seq_len, and get the num_samples message).
        for key, what in (("seq_len", "training.seq_len"), ("seed", "training.seed"),
                          ("num_samples", "another dataset, tokenizer or training.seq_len?")):
            saved, current = state_dict.get(key), getattr(self, key)
            if saved is None or current is None or saved == current:
                continue
            raise DataError(f"the checkpointed data loader state has {key}={saved}, but this run has {key}={current} "
                            f"({what}), so the data position cannot continue: restore the checkpointed run's "
                            f'setting, or add "dataloader" to checkpoint.exclude_from_loading to resume model, '
                            f"optimizer and step and start the data order over from the beginning")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.check_state_dict(state_dict)
        self.epoch = int(state_dict["epoch"])
        saved_world_size = int(state_dict.get("dp_world_size", self.dp_world_size))
        if saved_world_size == self.dp_world_size:
            self.yielded_in_epoch = int(state_dict["yielded_in_epoch"])
            return
        # Another data-parallel degree: resume at the global position (module docstring).
        consumed = int(state_dict.get("consumed_in_epoch", int(state_dict["yielded_in_epoch"]) * saved_world_size))
        if consumed >= self.samples_per_rank * self.dp_world_size:  # past this run's end of the epoch
            self.epoch, self.yielded_in_epoch = self.epoch + 1, 0
            return
        self.yielded_in_epoch = consumed // self.dp_world_size
        if consumed % self.dp_world_size:
            warnings.warn(f"the data position ({consumed} samples of epoch {self.epoch}, saved by {saved_world_size} "
                          f"data-parallel ranks) is not a multiple of the {self.dp_world_size} ranks of this run (the "
                          f"global batch size changed?): the last {consumed % self.dp_world_size} are read again",
                          stacklevel=2)
