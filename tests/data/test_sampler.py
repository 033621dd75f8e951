from __future__ import annotations

import itertools

import pytest

from torchtitan_like.data.sampler import ShardedSampler
from torchtitan_like.errors import DataError

NUM_SAMPLES = 103


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ranks_are_disjoint_and_cover_all_kept_samples_every_epoch(world_size):
    for epoch in range(2):
        per_rank = [set(ShardedSampler(NUM_SAMPLES, rank, world_size, seed=3).epoch_indices(epoch).tolist())
                    for rank in range(world_size)]
        assert all(len(indices) == NUM_SAMPLES // world_size for indices in per_rank)
        union = set().union(*per_rank)
        assert len(union) == sum(map(len, per_rank)) == NUM_SAMPLES - NUM_SAMPLES % world_size
        assert union <= set(range(NUM_SAMPLES))


def test_same_seed_same_order_other_seed_other_order_and_epochs_reshuffle():
    first = ShardedSampler(NUM_SAMPLES, 0, 2, seed=7)
    assert list(itertools.islice(first, 100)) == list(itertools.islice(ShardedSampler(NUM_SAMPLES, 0, 2, seed=7), 100))
    assert first.epoch_indices(0).tolist() != ShardedSampler(NUM_SAMPLES, 0, 2, seed=8).epoch_indices(0).tolist()
    assert first.epoch_indices(0).tolist() != first.epoch_indices(1).tolist()


def test_training_sampler_is_infinite_and_validation_sampler_is_one_ordered_pass():
    training = iter(ShardedSampler(10, 1, 2, seed=0))
    assert len(list(itertools.islice(training, 25))) == 25
    validation = ShardedSampler(10, 1, 2, shuffle=False, infinite=False)
    assert list(validation) == [1, 3, 5, 7, 9]
    assert list(validation) == [1, 3, 5, 7, 9]  # a second evaluation sees the same samples


def test_state_dict_resumes_mid_epoch_and_across_epochs():
    for consumed in (3, 51, 60):
        sampler = ShardedSampler(NUM_SAMPLES, 1, 2, seed=5)
        iterator = iter(sampler)
        list(itertools.islice(iterator, consumed))
        state = sampler.state_dict()
        expected = list(itertools.islice(iterator, 80))
        resumed = ShardedSampler(NUM_SAMPLES, 1, 2, seed=5)
        resumed.load_state_dict(state)
        assert list(itertools.islice(iter(resumed), 80)) == expected


def test_loading_state_of_another_seed_or_world_size_is_refused():
    state = ShardedSampler(NUM_SAMPLES, 0, 2, seed=5).state_dict()
    with pytest.raises(DataError, match="seed=5"):
        ShardedSampler(NUM_SAMPLES, 0, 2, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match="dp_world_size=2"):
        ShardedSampler(NUM_SAMPLES, 0, 4, seed=5).load_state_dict(state)
