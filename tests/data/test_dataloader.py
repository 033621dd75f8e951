from __future__ import annotations

import itertools
import random
import string

import pytest
import torch

from tests.data.conftest import make_job_config
from torchtitan_like.data import build_dataloader, build_tokenizer
from torchtitan_like.data.tokenizers import ByteTokenizer
from torchtitan_like.errors import DataError


def take(loader, count):
    return list(itertools.islice(iter(loader), count))


def test_batches_have_the_configured_shape_and_shifted_labels():
    config = make_job_config(seq_len=32, local_batch_size=3)
    loader = build_dataloader(config, build_tokenizer(config.model), dp_rank=0, dp_world_size=1)
    inputs, labels = next(iter(loader))
    assert inputs.shape == labels.shape == (3, 32)
    assert inputs.dtype == labels.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert loader.dataset.num_tokens > 2_500_000  # the built-in train split


def test_resume_from_state_dict_continues_with_the_same_batches():
    config = make_job_config(seq_len=16, local_batch_size=4, seed=11)
    tokenizer = ByteTokenizer()
    loader = build_dataloader(config, tokenizer, dp_rank=1, dp_world_size=2)
    iterator = iter(loader)
    list(itertools.islice(iterator, 5))
    state = loader.state_dict()
    continuing = list(itertools.islice(iterator, 4))
    resumed = build_dataloader(config, tokenizer, dp_rank=1, dp_world_size=2)
    resumed.load_state_dict(state)
    for (inputs, labels), (resumed_inputs, resumed_labels) in zip(continuing, take(resumed, 4), strict=True):
        assert torch.equal(inputs, resumed_inputs) and torch.equal(labels, resumed_labels)


def test_training_loops_over_epochs_and_reshuffles(tmp_path):
    (tmp_path / "doc.txt").write_text("x" * 200)
    config = make_job_config(dataset="local", dataset_path=str(tmp_path), seq_len=9, local_batch_size=2)
    loader = build_dataloader(config, ByteTokenizer(), dp_rank=0, dp_world_size=1)
    assert len(loader.dataset) == 20
    batches = take(loader, 25)  # 2.5 epochs
    assert len(batches) == 25
    assert loader.sampler.epoch == 2


def test_ranks_see_disjoint_samples(tmp_path):
    # Random letters make every 8-token window's content unique, so contents identify samples.
    (tmp_path / "doc.txt").write_text("".join(random.Random(0).choices(string.ascii_letters, k=2000)))
    config = make_job_config(dataset="local", dataset_path=str(tmp_path), seq_len=7, local_batch_size=1)
    seen = []
    for rank in range(4):
        loader = build_dataloader(config, ByteTokenizer(), dp_rank=rank, dp_world_size=4)
        seen.append({tuple(inputs[0].tolist()) for inputs, _ in take(loader, len(loader.sampler))})
    windows = sum(len(rank_windows) for rank_windows in seen)
    assert len(set().union(*seen)) == windows == (len(loader.dataset) // 4) * 4


def test_a_loader_state_resumes_under_another_data_parallel_degree_with_the_same_global_batches(tmp_path):
    # Random letters make every window's content unique, so contents identify samples.
    (tmp_path / "doc.txt").write_text("".join(random.Random(1).choices(string.ascii_letters, k=3000)))
    global_batch = 8

    def loaders(world_size):
        config = make_job_config(dataset="local", dataset_path=str(tmp_path), seq_len=7,
                                 local_batch_size=global_batch // world_size)
        return [build_dataloader(config, ByteTokenizer(), dp_rank=rank, dp_world_size=world_size)
                for rank in range(world_size)]

    def next_global_batches(iterators, count):
        return [{tuple(row.tolist()) for iterator in iterators for row in next(iterator)[0]} for _ in range(count)]

    original = loaders(4)
    iterators = [iter(loader) for loader in original]
    next_global_batches(iterators, 7)
    states = [loader.state_dict() for loader in original]
    resumed = loaders(2)
    for rank, loader in enumerate(resumed):
        loader.load_state_dict(states[rank])
    expected = next_global_batches(iterators, 10)
    assert next_global_batches([iter(loader) for loader in resumed], 10) == expected
    assert all(len(batch) == global_batch for batch in expected)


def test_validation_uses_the_held_out_split_once_in_order():
    config = make_job_config(seq_len=128, local_batch_size=8)
    config.validation.seq_len = 64
    tokenizer = ByteTokenizer()
    validation = build_dataloader(config, tokenizer, dp_rank=0, dp_world_size=2, split="validation")
    first_pass = list(validation)
    assert len(first_pass) == len(validation.dataset) // 2 // 8
    assert first_pass[0][0].shape == (8, 64)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first_pass, list(validation), strict=True))
    training = build_dataloader(config, tokenizer, dp_rank=0, dp_world_size=1)
    assert validation.dataset.num_tokens < training.dataset.num_tokens / 5


def test_too_small_corpus_says_how_many_tokens_exist_and_are_needed(tmp_path):
    (tmp_path / "tiny.txt").write_text("abc")  # BOS + 3 + EOS = 5 tokens
    config = make_job_config(dataset="local", dataset_path=str(tmp_path), seq_len=4)
    expected = rf"{tmp_path} .* has 5 tokens, too few: 2 data-parallel rank\(s\) .* need at least 10"
    with pytest.raises(DataError, match=expected):
        build_dataloader(config, ByteTokenizer(), dp_rank=0, dp_world_size=2)


def test_empty_corpus_and_missing_path_are_data_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    config = make_job_config(dataset="local", dataset_path=str(tmp_path))
    with pytest.raises(DataError, match=r"has 0 tokens"):
        build_dataloader(config, ByteTokenizer(), 0, 1)
    config = make_job_config(dataset="local", dataset_path=str(tmp_path / "nope"))
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        build_dataloader(config, ByteTokenizer(), 0, 1)
    with pytest.raises(DataError, match="needs training.dataset_path"):
        build_dataloader(make_job_config(dataset="local"), ByteTokenizer(), 0, 1)


@pytest.mark.parametrize("split", ["train", "validation"])
def test_iterating_a_loader_leaves_the_global_torch_rng_untouched(split):
    # The trainer restores the RNG state from a checkpoint and then calls iter(loader); a draw here
    # would make a resumed run's random stream differ from the uninterrupted run's.
    config = make_job_config(seq_len=16, local_batch_size=2)
    loader = build_dataloader(config, ByteTokenizer(), dp_rank=0, dp_world_size=1, split=split)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    next(iter(loader))
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_a_relaunch_with_another_local_batch_size_continues_with_the_next_samples():
    # The position is kept in samples, not batches: a changed batch size (or gradient accumulation)
    # reads on from the very sample where the checkpointed run stopped.
    tokenizer = ByteTokenizer()
    straight = take(build_dataloader(make_job_config(seq_len=16, local_batch_size=2), tokenizer, 0, 1), 6)
    loader = build_dataloader(make_job_config(seq_len=16, local_batch_size=2), tokenizer, 0, 1)
    take(loader, 2)
    resumed = build_dataloader(make_job_config(seq_len=16, local_batch_size=4), tokenizer, 0, 1)
    resumed.load_state_dict(loader.state_dict())
    for (inputs, _), expected in zip(take(resumed, 2), (straight[2:4], straight[4:6]), strict=True):
        assert torch.equal(inputs, torch.cat([batch[0] for batch in expected]))


def test_a_relaunch_with_another_seq_len_or_seed_is_refused_naming_the_key_and_both_values():
    from torchtitan_like.data.dataloader import check_loader_state  # what the checkpoint load runs

    tokenizer = ByteTokenizer()
    loader = build_dataloader(make_job_config(seq_len=16, local_batch_size=2), tokenizer, 0, 1)
    take(loader, 1)
    state = loader.state_dict()
    longer = build_dataloader(make_job_config(seq_len=32, local_batch_size=2), tokenizer, 0, 1)
    with pytest.raises(DataError, match=r"seq_len=16, but this run has seq_len=32 \(training\.seq_len\).*"
                                        r'add "dataloader" to checkpoint\.exclude_from_loading'):
        check_loader_state(longer, state)
    reseeded = build_dataloader(make_job_config(seq_len=16, local_batch_size=2, seed=3), tokenizer, 0, 1)
    with pytest.raises(DataError, match=r"seed=0, but this run has seed=3 \(training\.seed\)"):
        check_loader_state(reseeded, state)
