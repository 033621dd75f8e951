"""CheckpointManager: exact resume, interval and final saves, async saves, partial loads and errors."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from tests.checkpoint.common import (FakeDataloader, build_model, build_training, checkpoint_config, run_on_ranks,
                                     tiny_args, train_step)
from torchtitan_like.checkpoint import CheckpointManager, TrainState, create_seed_checkpoint, folders
from torchtitan_like.checkpoint.state import ModelState
from torchtitan_like.errors import ConfigError, UserError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _training(seed=0, position=0, args=None):
    model = build_model(args, seed=seed)
    optimizer, scheduler = build_training(model)
    return model, optimizer, scheduler, FakeDataloader(position), TrainState()


def _manager(folder, training, **config):
    model, optimizer, scheduler, dataloader, train_state = training
    return CheckpointManager(checkpoint_config(**config), str(folder), model, optimizer, scheduler, dataloader,
                             {"train_state": train_state})


def _snapshot(model, optimizer, scheduler):
    return ({name: value.clone() for name, value in model.state_dict().items()},
            {index: {key: value.clone() for key, value in state.items()}
             for index, state in optimizer.state_dict()["state"].items()},
            optimizer.state_dict()["param_groups"], scheduler.state_dict())


def _assert_same(first, second):
    (model_a, optim_a, groups_a, sched_a), (model_b, optim_b, groups_b, sched_b) = first, second
    for name in model_a:
        assert torch.equal(model_a[name], model_b[name]), name
    assert optim_a.keys() == optim_b.keys()
    for index in optim_a:
        for key in optim_a[index]:
            assert torch.equal(optim_a[index][key], optim_b[index][key]), (index, key)
    assert groups_a == groups_b
    assert sched_a == sched_b


def test_resume_restores_everything_bitwise_and_the_next_step_is_identical(tmp_path):
    original = _training(seed=0, position=7)
    model, optimizer, scheduler, dataloader, train_state = original
    torch.manual_seed(123)
    for step in (1, 2):
        train_state.losses.append(float(train_step(model, optimizer, scheduler)))
        train_state.step, train_state.tokens_seen = step, step * 32
    manager = _manager(tmp_path, original)
    assert manager.save(2)
    saved = _snapshot(model, optimizer, scheduler)
    loss_continued = train_step(model, optimizer, scheduler)

    restored = _training(seed=1)
    torch.manual_seed(999)  # the RNG state must come from the checkpoint
    assert _manager(tmp_path, restored).load() == 2
    model_b, optimizer_b, scheduler_b, dataloader_b, train_state_b = restored
    _assert_same(saved, _snapshot(model_b, optimizer_b, scheduler_b))
    assert dataloader_b.position == 7
    assert (train_state_b.step, train_state_b.tokens_seen, train_state_b.losses) == (2, 64, train_state.losses[:2])
    loss_resumed = train_step(model_b, optimizer_b, scheduler_b)
    assert torch.equal(loss_continued, loss_resumed)
    _assert_same(_snapshot(model, optimizer, scheduler), _snapshot(model_b, optimizer_b, scheduler_b))


def test_saves_only_at_the_interval_and_at_the_end(tmp_path):
    manager = _manager(tmp_path, _training(), interval=3)
    assert [step for step in range(1, 8) if manager.save(step, last=(step == 7))] == [3, 6, 7]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-3", "step-6", "step-7"]


def test_async_save_produces_a_complete_loadable_checkpoint(tmp_path):
    training = _training(position=3)
    train_step(*training[:3])
    manager = _manager(tmp_path, training, async_mode="async")
    manager.save(1)
    expected = _snapshot(*training[:3])
    train_step(*training[:3])  # training goes on while the save runs
    manager.close()
    assert os.listdir(tmp_path / "checkpoint") == ["step-1"]
    restored = _training(seed=5)
    assert _manager(tmp_path, restored).load() == 1
    _assert_same(expected, _snapshot(*restored[:3]))
    assert restored[3].position == 3


def test_final_model_only_export_sits_beside_the_full_checkpoint_which_still_resumes(tmp_path):
    training = _training(position=6)
    train_step(*training[:3])
    training[4].step = 4
    manager = _manager(tmp_path, training, last_save_model_only=True, export_dtype="bfloat16")
    manager.save(4, last=True)
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["export", "step-4"]
    assert os.listdir(tmp_path / "checkpoint" / "export") == ["step-4"]
    resumed = _training(seed=3, position=11)
    assert _manager(tmp_path, resumed).load() == 4  # the full checkpoint: everything comes back
    _assert_same(_snapshot(*training[:3]), _snapshot(*resumed[:3]))
    assert resumed[3].position == 6 and resumed[4].step == 4
    # The export is a model-only checkpoint root of its own, in export_dtype.
    exported = _training(seed=3, position=11)
    config = dict(initial_load_path=str(tmp_path / "checkpoint" / "export"))
    assert _manager(tmp_path / "other_run", exported, **config).load() == 0
    for name, value in training[0].state_dict().items():
        assert torch.equal(exported[0].state_dict()[name], value.to(torch.bfloat16).float()), name
    assert exported[3].position == 11 and not exported[1].state


def _write_model_only(root, step, model):
    """A model-only step folder in a run's own root, as older versions wrote the final save."""
    tmp_path, final_path = folders.tmp_folder(str(root), step), folders.step_folder(str(root), step)
    dcp.save({"model": ModelState([model]).state_dict()}, storage_writer=FileSystemWriter(tmp_path), no_dist=True)
    folders.commit(tmp_path, final_path, step, world_size=1, model_only=True)


def test_a_newer_model_only_step_folder_never_hides_the_full_checkpoint(tmp_path):
    training = _training(position=5)
    train_step(*training[:3])
    training[4].step = 2
    _manager(tmp_path, training).save(2)
    _write_model_only(tmp_path / "checkpoint", 4, build_model(seed=9))
    resumed = _training(seed=3)
    with pytest.warns(UserWarning, match="step-4 holds model weights only and cannot resume"):
        assert _manager(tmp_path, resumed).load() == 2
    _assert_same(_snapshot(*training[:3]), _snapshot(*resumed[:3]))
    assert resumed[3].position == 5 and resumed[4].step == 2


def test_a_model_only_checkpoint_alone_initializes_the_model_and_training_starts_at_step_0(tmp_path):
    source = build_model(seed=9)
    _write_model_only(tmp_path / "checkpoint", 4, source)
    resumed = _training(seed=3, position=11)
    with pytest.warns(UserWarning, match="training starts at step 0"):
        assert _manager(tmp_path, resumed).load() == 0
    assert torch.equal(resumed[0].output.weight, source.output.weight)
    assert resumed[3].position == 11 and resumed[4].step == 0 and not resumed[1].state


def test_a_finished_async_save_is_committed_by_the_next_save_call_without_waiting(tmp_path):
    manager = _manager(tmp_path, _training(), async_mode="async", interval=10)
    assert manager.save(10)
    future = manager._pending[0]
    deadline = time.monotonic() + 60
    while not future.done():
        assert time.monotonic() < deadline, "async save did not finish"
        time.sleep(0.05)
    assert os.listdir(tmp_path / "checkpoint") == ["step-10.tmp"]
    assert not manager.save(11)  # not due, but commits the finished save: a crash now keeps step 10
    assert os.listdir(tmp_path / "checkpoint") == ["step-10"]
    folders.check_complete(str(tmp_path / "checkpoint" / "step-10"))
    manager.close()


def test_pinned_staging_buffers_of_model_and_optimizer_are_allocated_once(tmp_path, monkeypatch):
    import torch.distributed._state_dict_utils as state_dict_utils
    import torch.distributed.checkpoint.staging as staging
    from torchtitan_like.checkpoint import manager as manager_module

    pinned = []
    real_create = state_dict_utils._create_cpu_state_dict

    def counting_create(state_dict, pin_memory=False, **kwargs):
        if pin_memory:
            pinned.append(set(state_dict))
        return real_create(state_dict, pin_memory=False, **kwargs)  # no CUDA here: count, do not pin

    monkeypatch.setattr(CheckpointManager, "_use_pinned_memory", lambda self: True)  # as if on CUDA
    monkeypatch.setattr(staging, "_create_cpu_state_dict", counting_create)
    monkeypatch.setattr(manager_module, "_create_cpu_state_dict", counting_create, raising=False)
    training = _training()
    manager = _manager(tmp_path, training, async_mode="async_with_pinned_mem")
    snapshots = []
    for step in (1, 2, 3):
        train_step(*training[:3])
        training[4].losses.append(float(step))  # the loss history grows: its buffer is re-made
        manager.save(step)
        snapshots.append(_snapshot(*training[:3]))
    manager.close()
    model_keys = set(training[0].state_dict())
    assert sum(1 for keys in pinned if keys == model_keys) == 1
    assert sum(1 for keys in pinned if any(key.startswith("state.") for key in keys)) == 1  # optimizer
    for step, expected in zip((1, 2, 3), snapshots):  # reused buffers still hold each save's values
        restored = _training(seed=5)
        assert _manager(tmp_path, restored, load_step=step).load() == step
        _assert_same(expected, _snapshot(*restored[:3]))
        assert restored[4].losses == [1.0, 2.0, 3.0][:step]


def _slow_rank_async_save(rank, world_size, folder):
    """Rank 1 writes its shard 1.5 s late; rank 0 polls without blocking and must not commit before
    rank 1's file is written (its save completes only after gathering every rank's results)."""
    from torch.distributed.checkpoint import filesystem

    if rank == 1:
        real_write = filesystem.FileSystemWriter.write_data

        def slow_write(self, plan, planner):
            time.sleep(1.5)
            return real_write(self, plan, planner)

        filesystem.FileSystemWriter.write_data = slow_write
    manager = _manager(folder, _training(), async_mode="async", interval=2)
    manager.save(2)
    deadline = time.monotonic() + 60
    while manager._pending is not None:
        assert time.monotonic() < deadline, "async save did not finish"
        manager.save(3)  # not due: only polls
        time.sleep(0.05)
    if rank == 0:  # what the commit listed, as soon as polling committed it
        marker = folders.check_complete(os.path.join(folder, "checkpoint", "step-2"))
        with open(os.path.join(folder, "committed_files.json"), "w") as handle:
            json.dump(sorted(marker["files"]), handle)
    manager.close()


def test_async_commit_by_polling_waits_for_every_rank_to_finish_writing(tmp_path):
    run_on_ranks(_slow_rank_async_save, 2, str(tmp_path), timeout=90)
    committed = json.loads((tmp_path / "committed_files.json").read_text())
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(committed), committed  # rank 1's late shard too


def test_exclude_from_loading_keeps_the_current_dataloader_and_optimizer(tmp_path):
    training = _training(position=9)
    train_step(*training[:3])
    _manager(tmp_path, training).save(1)
    restored = _training(seed=2, position=1)
    _manager(tmp_path, restored, exclude_from_loading=["dataloader", "optimizer"]).load()
    assert restored[3].position == 1 and not restored[1].state
    assert torch.equal(restored[0].output.weight, training[0].output.weight)


def test_a_data_position_of_another_corpus_is_refused_by_load_not_by_the_first_batch(tmp_path):
    # StatefulDataLoader applies a loaded state only at the next iter(): the mismatch surfaced after
    # the trainer had logged the resume and rewritten the run's config.toml with the other corpus.
    from tests.data.conftest import make_job_config
    from torchtitan_like.data import build_dataloader
    from torchtitan_like.data.tokenizers import ByteTokenizer
    from torchtitan_like.errors import DataError

    def loader(seq_len):
        return build_dataloader(make_job_config(seq_len=seq_len, local_batch_size=1), ByteTokenizer(), 0, 1)

    training = _training()
    saved_loader = loader(8)
    next(iter(saved_loader))
    _manager(tmp_path, training[:3] + (saved_loader, training[4])).save(1)
    other = _training()
    manager = _manager(tmp_path, other[:3] + (loader(16), other[4]))
    with pytest.raises(DataError, match=r"seq_len=8, but this run has seq_len=16 \(training\.seq_len\)"):
        manager.load()


def test_unknown_exclude_from_loading_key_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="dataloder.*did you mean \"dataloader\""):
        _manager(tmp_path, _training(), exclude_from_loading=["dataloder"])


def test_initial_load_path_initializes_a_run_without_its_own_checkpoint(tmp_path):
    seed_model = build_model(seed=4)
    create_seed_checkpoint(checkpoint_config(), str(tmp_path / "seed"), seed_model)
    restored = _training(seed=0)
    config = dict(initial_load_path=str(tmp_path / "seed" / "checkpoint"))
    assert _manager(tmp_path / "run", restored, **config).load() == 0
    assert torch.equal(restored[0].layers["1"].feed_forward.w2.weight, seed_model.layers["1"].feed_forward.w2.weight)


def test_load_step_without_that_checkpoint_is_a_clear_error(tmp_path):
    manager = _manager(tmp_path, _training(), load_step=5)
    with pytest.raises(ConfigError, match=r"load_step = 5: no complete checkpoint step-5 .*complete steps: none"):
        manager.load()
    manager.save(2)
    with pytest.raises(ConfigError, match=r"complete steps: 2"):
        manager.load()


def test_checkpoint_of_another_model_shape_names_the_mismatched_tensors(tmp_path):
    _manager(tmp_path, _training()).save(1)
    wider = _training(args=tiny_args(vocab_size=256))
    with pytest.raises(UserError) as error:
        _manager(tmp_path, wider).load()
    message = str(error.value)
    assert "tok_embeddings.weight: checkpoint (128, 64) vs model (256, 64)" in message
    assert "output.weight: checkpoint (128, 64) vs model (256, 64)" in message


def test_unwritable_checkpoint_folder_fails_at_construction(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="not writable"):
        _manager(blocker, _training())


def test_disabled_manager_neither_saves_nor_loads(tmp_path):
    manager = _manager(tmp_path, _training(), enable=False)
    assert not manager.save(1, last=True) and manager.load() == 0
    assert not os.path.exists(tmp_path / "checkpoint")
