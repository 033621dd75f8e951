"""Resharding through DCP: a checkpoint written under FSDP on 2 ranks loads on 1 process and back; a
data-parallel rank without a saved data position of its own resumes from another rank's global one."""

from __future__ import annotations

import os
import random
import string
import warnings

import pytest
import torch

from tests.checkpoint.common import (FakeDataloader, build_model, build_training, checkpoint_config, run_on_ranks,
                                     train_step)
from tests.data.conftest import make_job_config
from torchtitan_like.checkpoint import CheckpointManager
from torchtitan_like.checkpoint.state import DataloaderState, OptimizerState
from torchtitan_like.data import build_dataloader
from torchtitan_like.data.tokenizers import ByteTokenizer
from torchtitan_like.distributed.tensors import full_tensor

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _fsdp_model(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2,))
    model = build_model(seed=seed)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_values(model, optimizer) -> dict[str, torch.Tensor]:
    """Gathered model and optimizer tensors keyed by name (a collective under FSDP)."""
    values = {f"model.{name}": full_tensor(value).detach().clone() for name, value in model.state_dict().items()}
    for key, value in OptimizerState([model], optimizer).state_dict().items():
        if isinstance(value, torch.Tensor):
            values[f"optimizer.{key}"] = full_tensor(value).detach().clone()
    return values


def _assert_values_equal(expected, actual):
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def _load_then_save_under_fsdp(rank, world_size, root):
    # 1 process -> FSDP on 2 ranks.
    model = _fsdp_model(seed=3)
    optimizer, scheduler = build_training(model)
    dataloader = FakeDataloader()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank 1 has no dataloader state of its own in a 1-rank checkpoint
        single = CheckpointManager(checkpoint_config(), os.path.join(root, "single"), model, optimizer, scheduler,
                                   dataloader)
        assert single.load() == 1
    _assert_values_equal(torch.load(os.path.join(root, "single.pt"), weights_only=True), _full_values(model, optimizer))
    assert scheduler.last_epoch == 1
    assert dataloader.position == 4  # rank 1 takes rank 0's state (the fake loader has no global rule)

    # FSDP on 2 ranks -> (after one more step) a checkpoint for the parent's single process.
    torch.manual_seed(0)  # the same batch on both ranks, so the step equals a 1-process step
    train_step(model, optimizer, scheduler)
    fsdp_folder = os.path.join(root, "fsdp")
    CheckpointManager(checkpoint_config(), fsdp_folder, model, optimizer, scheduler, FakeDataloader(10 + rank)).save(2)
    values = _full_values(model, optimizer)
    if rank == 0:
        torch.save(values, os.path.join(root, "fsdp.pt"))
    dataloader = FakeDataloader()
    CheckpointManager(checkpoint_config(), fsdp_folder, model, optimizer, scheduler, dataloader).load()
    assert dataloader.position == 10 + rank  # each data-parallel rank gets its own position back


def test_checkpoints_reshard_from_one_process_to_fsdp_on_two_ranks_and_back(tmp_path):
    model = build_model()
    optimizer, scheduler = build_training(model)
    train_step(model, optimizer, scheduler)
    CheckpointManager(checkpoint_config(), str(tmp_path / "single"), model, optimizer, scheduler,
                      FakeDataloader(4)).save(1)
    torch.save(_full_values(model, optimizer), tmp_path / "single.pt")

    run_on_ranks(_load_then_save_under_fsdp, 2, str(tmp_path))

    model = build_model(seed=5)
    optimizer, scheduler = build_training(model)
    dataloader = FakeDataloader()
    manager = CheckpointManager(checkpoint_config(), str(tmp_path / "fsdp"), model, optimizer, scheduler, dataloader)
    assert manager.load() == 2
    _assert_values_equal(torch.load(tmp_path / "fsdp.pt", weights_only=True), _full_values(model, optimizer))
    assert scheduler.last_epoch == 2 and dataloader.position == 10


def test_a_rank_without_its_own_dataloader_state_resumes_from_another_ranks_global_position(tmp_path):
    # 2 data-parallel ranks save; 4 load: ranks 2 and 3 have no key and read dp_rank_0's state.
    (tmp_path / "doc.txt").write_text("".join(random.Random(2).choices(string.ascii_letters, k=3000)))

    def loaders(world_size):
        config = make_job_config(dataset="local", dataset_path=str(tmp_path), seq_len=7, local_batch_size=8 // world_size)
        return [build_dataloader(config, ByteTokenizer(), dp_rank=rank, dp_world_size=world_size)
                for rank in range(world_size)]

    def next_global_batches(iterators, count):
        return [{tuple(row.tolist()) for iterator in iterators for row in next(iterator)[0]} for _ in range(count)]

    original = loaders(2)
    iterators = [iter(loader) for loader in original]
    next_global_batches(iterators, 5)
    saved = {}
    for rank, loader in enumerate(original):
        saved.update(DataloaderState(loader, rank).state_dict())
    resumed = loaders(4)
    for rank, loader in enumerate(resumed):
        state = DataloaderState(loader, rank)
        source = f"dp_rank_{rank if rank < 2 else 0}"
        assert state.source_key(saved) == source and list(state.load_template(saved)) == [source]
        state.load_state_dict(saved)
    assert next_global_batches([iter(loader) for loader in resumed], 6) == next_global_batches(iterators, 6)
