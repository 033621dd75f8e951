from __future__ import annotations

import itertools
import warnings

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


def test_loading_state_of_another_seed_or_corpus_size_is_refused():
    state = ShardedSampler(NUM_SAMPLES, 0, 2, seed=5).state_dict()
    with pytest.raises(DataError, match="seed=5"):
        ShardedSampler(NUM_SAMPLES, 0, 2, seed=6).load_state_dict(state)
    with pytest.raises(DataError, match=f"num_samples={NUM_SAMPLES}"):
        ShardedSampler(NUM_SAMPLES + 1, 0, 2, seed=5).load_state_dict(state)


def global_batches(samplers, local_batch_size: int, count: int) -> list[set[int]]:
    """The union over ranks of each of the next `count` batches (the ranks step in lockstep)."""
    iterators = [iter(sampler) for sampler in samplers]
    return [set().union(*(itertools.islice(iterator, local_batch_size) for iterator in iterators))
            for _ in range(count)]


def samplers_after(world_size: int, local_batch_size: int, steps: int) -> list[ShardedSampler]:
    samplers = [ShardedSampler(NUM_SAMPLES, rank, world_size, seed=5) for rank in range(world_size)]
    global_batches(samplers, local_batch_size, steps)
    return samplers


def resharded(states: list[dict], world_size: int) -> list[ShardedSampler]:
    """Samplers of `world_size` ranks loading the saved states (rank 0's where a rank has none)."""
    samplers = [ShardedSampler(NUM_SAMPLES, rank, world_size, seed=5) for rank in range(world_size)]
    for rank, sampler in enumerate(samplers):
        sampler.load_state_dict(states[rank] if rank < len(states) else states[0])
    return samplers


@pytest.mark.parametrize("old_world, new_world", [(4, 2), (4, 1), (2, 4)])
@pytest.mark.parametrize("steps", [1, 5])
def test_a_new_data_parallel_degree_resumes_at_the_global_position_with_the_same_global_batches(
        old_world, new_world, steps):
    global_batch = 8
    original = samplers_after(old_world, global_batch // old_world, steps)
    states = [sampler.state_dict() for sampler in original]
    assert {state["consumed_in_epoch"] for state in states} == {steps * global_batch}
    resumed = resharded(states, new_world)
    assert all(sampler.yielded_in_epoch == steps * global_batch // new_world for sampler in resumed)
    # Mid-epoch: 5 + 5 steps of 8 stay below both runs' epoch ends (100 or 102 of 103 samples).
    expected = global_batches(original, global_batch // old_world, 5)
    assert global_batches(resumed, global_batch // new_world, 5) == expected
    assert all(len(batch) == global_batch for batch in expected)


@pytest.mark.parametrize("old_world, new_world", [(4, 2), (2, 4)])
def test_across_the_epoch_boundary_a_resharded_run_continues_as_a_run_of_the_new_degree(old_world, new_world):
    # 12 steps of 8 = 96 samples; the epoch ends at 100 samples for 4 ranks, 102 for 2 (N = 103).
    global_batch, steps = 8, 12
    states = [sampler.state_dict() for sampler in samplers_after(old_world, global_batch // old_world, steps)]
    resumed = resharded(states, new_world)
    native = samplers_after(new_world, global_batch // new_world, steps)
    assert global_batches(resumed, global_batch // new_world, 30) == global_batches(native, global_batch // new_world, 30)


def test_a_position_not_divisible_by_the_new_degree_rounds_down_with_a_warning():
    state = samplers_after(2, 1, 3)[0].state_dict()  # 6 samples of the epoch read by 2 ranks
    sampler = ShardedSampler(NUM_SAMPLES, 0, 4, seed=5)
    with pytest.warns(UserWarning, match="the last 2 are read again"):
        sampler.load_state_dict(state)
    assert (sampler.epoch, sampler.yielded_in_epoch) == (0, 1)


def test_a_position_past_the_new_epoch_end_starts_the_next_epoch():
    # 2 ranks read 102 of 103 samples; 4 ranks keep only 100 per epoch.
    state = samplers_after(2, 51, 1)[0].state_dict()
    assert (state["epoch"], state["consumed_in_epoch"]) == (0, 102)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is read again
        resumed = resharded([state], 4)
    native = [ShardedSampler(NUM_SAMPLES, rank, 4, seed=5) for rank in range(4)]
    for sampler in native:
        sampler.epoch = 1
    assert global_batches(resumed, 2, 10) == global_batches(native, 2, 10)


def test_a_state_saved_before_the_global_count_existed_reshards_from_its_world_size():
    state = samplers_after(4, 2, 3)[1].state_dict()
    del state["consumed_in_epoch"]
    sampler = ShardedSampler(NUM_SAMPLES, 1, 2, seed=5)
    sampler.load_state_dict(state)
    assert sampler.yielded_in_epoch == 12
