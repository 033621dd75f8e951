"""A checkpoint write that fails (checkpoint/writing.py, manager.py): a full disk mid-save, sync or
async, on one rank of two, while committing or exporting, raises a StorageError on every rank that
names the folder, the OS error and the free space; the partial `.tmp` folder is removed and the
previous checkpoint stays complete, and resumes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem

from tests.checkpoint.common import build_model, build_training, checkpoint_config, run_on_ranks, train_step
from tests.helpers import FileOnAFullDisk
from torchtitan_like.checkpoint import CheckpointManager, folders
from torchtitan_like.checkpoint.writing import CheckpointWriter
from torchtitan_like.errors import StorageError
from torchtitan_like.filesystem import format_bytes

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _trained(dump, **config):
    """A manager over a model trained one step, and that model."""
    model = build_model()
    optimizer, scheduler = build_training(model)
    train_step(model, optimizer, scheduler)
    return CheckpointManager(checkpoint_config(**config), str(dump), model, optimizer, scheduler), model


def _assert_resumes_from(dump, step, expected_model):
    """Only step-`step` is left, complete, and a fresh manager restores exactly `expected_model`."""
    assert sorted(os.listdir(os.path.join(dump, "checkpoint"))) == [f"step-{step}"]
    fresh = build_model(seed=5)
    optimizer, scheduler = build_training(fresh)
    assert CheckpointManager(checkpoint_config(), str(dump), fresh, optimizer, scheduler).load() == step
    for name, value in expected_model.items():
        assert torch.equal(fresh.state_dict()[name], value), name


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_disk_streams(room: int):
    """A stand-in for DCP's FileSystem.create_stream on a disk with `room` bytes left: less than a
    checkpoint, so the data file of the save runs out mid-way (torch.save then raises a RuntimeError
    whose __context__ is the OSError)."""
    disk = {"bytes": room}

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        with open(path, mode) as stream:
            yield FileOnAFullDisk(stream, disk)

    return create_stream


def test_a_save_that_fills_the_disk_raises_a_storage_error_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    manager, model = _trained(tmp_path, keep_latest_k=1)
    manager.save(2)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    monkeypatch.setattr(FileSystem, "create_stream", _full_disk_streams(room=100_000))
    with pytest.raises(StorageError) as raised:  # was: CheckpointException "RuntimeError: ... unexpected pos"
        manager.save(4)
    message = str(raised.value)
    tmp = os.path.join(tmp_path, "checkpoint", "step-4.tmp")
    assert message.startswith(f"saving checkpoint step 4 failed: {tmp}: No space left on device (ENOSPC); ")
    assert " free of " in message and "The partial step-4.tmp was removed" in message
    assert f"{os.path.join(tmp_path, 'checkpoint', 'step-2')} (" in message and "resumes from step 2" in message
    monkeypatch.undo()
    _assert_resumes_from(tmp_path, 2, saved)  # keep_latest_k = 1 deleted nothing before a commit


def test_an_async_save_that_fails_raises_when_waited_for_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    manager, model = _trained(tmp_path, keep_latest_k=1, async_mode="async", interval=2)
    manager.save(2)
    manager.maybe_wait()
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    monkeypatch.setenv("TORCHTITAN_LIKE_FAULT", "0:4:enospc")
    assert manager.save(4)  # the write fails in the background
    with pytest.raises(StorageError, match=r"saving checkpoint step 4 asynchronously failed: .*step-4\.tmp: "
                                           r"No space left on device \(ENOSPC\); .* free of "):
        manager.maybe_wait()
    manager.close()  # nothing left in flight: no second error
    _assert_resumes_from(tmp_path, 2, saved)


def test_a_commit_that_cannot_write_its_marker_raises_and_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    manager, model = _trained(tmp_path, keep_latest_k=1)
    manager.save(2)
    saved = {name: value.clone() for name, value in model.state_dict().items()}

    monkeypatch.setattr(folders.json, "dump", _no_space)  # the marker's write
    with pytest.raises(StorageError, match=r"committing step-4 failed: .*step-4\.tmp: No space left on device"):
        manager.save(4)
    monkeypatch.undo()
    _assert_resumes_from(tmp_path, 2, saved)


def test_a_failed_export_says_the_full_checkpoint_of_the_last_step_was_committed(tmp_path, monkeypatch):
    manager, _ = _trained(tmp_path, last_save_model_only=True)
    real_write_data = CheckpointWriter.write_data

    def write_data(self, plan, planner):
        if os.path.basename(os.path.dirname(self.path)) == "export":
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_write_data(self, plan, planner)

    monkeypatch.setattr(CheckpointWriter, "write_data", write_data)
    with pytest.raises(StorageError) as raised:
        manager.save(4, last=True)
    message = str(raised.value)
    assert "saving the model-only export of step 4 failed: " in message and "(EDQUOT)" in message
    assert f"{os.path.join(tmp_path, 'checkpoint', 'step-4')} was committed" in message
    assert os.listdir(os.path.join(tmp_path, "checkpoint", "export")) == []  # no export/step-4.tmp
    folders.check_complete(os.path.join(tmp_path, "checkpoint", "step-4"))


def test_a_failed_save_that_is_not_the_file_systems_keeps_dcps_report(tmp_path, monkeypatch):
    manager, _ = _trained(tmp_path)

    def write_data(self, plan, planner):
        raise ValueError("a bug in a planner")

    monkeypatch.setattr(CheckpointWriter, "write_data", write_data)
    with pytest.raises(CheckpointException, match="a bug in a planner"):
        manager.save(2)
    assert os.listdir(os.path.join(tmp_path, "checkpoint")) == []  # the partial step-2.tmp is removed too


def _storage_error(call) -> str | None:
    try:
        call()
    except StorageError as error:
        return str(error)
    return None


def _two_ranks_run_out_of_space(rank, world_size, dump):
    """Step 2 is saved; then rank 1 runs out of space writing step 4 (sync) and step 6 (async, the
    `enospc` fault), and rank 0 writing step 8's marker. Every rank must raise each time (none may wait for the other);
    then both resume step 2."""
    warnings.simplefilter("ignore")
    manager, model = _trained(dump, keep_latest_k=1)
    manager.save(2)
    saved = {name: value.clone() for name, value in model.state_dict().items()}
    results = {}
    real_create_stream = FileSystem.create_stream
    if rank == 1:  # its disk is full: DCP sends rank 0 its error pickled, without the OSError behind it
        FileSystem.create_stream = _full_disk_streams(room=100_000)
    results["sync"] = _storage_error(lambda: manager.save(4))
    FileSystem.create_stream = real_create_stream
    os.environ["TORCHTITAN_LIKE_FAULT"] = "1:6:enospc"
    async_manager, _ = _trained(dump, keep_latest_k=1, async_mode="async", interval=2)
    async_manager.save(6)
    results["async"] = _storage_error(async_manager.maybe_wait)
    async_manager.close()
    del os.environ["TORCHTITAN_LIKE_FAULT"]
    real_dump = folders.json.dump
    if rank == 0:  # before: rank 1 waited in a barrier for a commit that had failed, until the timeout
        folders.json.dump = _no_space
    results["commit"] = _storage_error(lambda: manager.save(8))
    folders.json.dump = real_dump
    fresh = build_model(seed=5)
    results["loaded"] = CheckpointManager(checkpoint_config(), dump, fresh, None).load()
    results["restored"] = all(torch.equal(fresh.state_dict()[name], value) for name, value in saved.items())
    with open(os.path.join(dump, f"rank{rank}.json"), "w") as handle:
        json.dump(results, handle)


def test_a_full_disk_on_one_rank_stops_every_rank_with_the_same_error_and_both_resume(tmp_path):
    run_on_ranks(_two_ranks_run_out_of_space, 2, str(tmp_path), timeout=120)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert results[0] == results[1]  # the same message on both ranks
    outcome = results[0]
    assert outcome["sync"].startswith(f"saving checkpoint step 4 on rank 1 failed: "
                                      f"{tmp_path / 'checkpoint' / 'step-4.tmp'}: No space left on device (ENOSPC); ")
    assert "resumes from step 2" in outcome["sync"]
    assert outcome["async"].startswith("saving checkpoint step 6 asynchronously on rank 1 failed: ")
    assert outcome["commit"].startswith("committing step-8 failed: ") and "No space left" in outcome["commit"]
    assert outcome["loaded"] == 2 and outcome["restored"]
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2"]


def test_a_commit_that_leaves_less_room_than_a_checkpoint_warns_and_so_does_the_next_start(tmp_path, monkeypatch):
    manager, model = _trained(tmp_path)

    def low_space_warnings(action):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            action()
        return [str(warning.message) for warning in caught if "the next save will fail" in str(warning.message)]

    assert low_space_warnings(lambda: manager.save(1, force=True)) == []  # this disk has room
    marker = folders.check_complete(os.path.join(tmp_path, "checkpoint", "step-1"))
    size = sum(marker["files"].values())
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=size - 1))
    after_commit = low_space_warnings(lambda: manager.save(2, force=True))
    assert len(after_commit) == 1, after_commit
    assert f"less than the {format_bytes(size)} of its newest checkpoint step-2" in after_commit[0]
    at_start = low_space_warnings(lambda: CheckpointManager(checkpoint_config(), str(tmp_path), model, None))
    assert len(at_start) == 1 and "step-2" in at_start[0], at_start


def test_a_seed_checkpoint_onto_a_full_disk_is_a_storage_error_and_leaves_no_tmp(tmp_path, monkeypatch):
    """The model-only save that seed checkpoints and Hugging Face imports share (save_model_only)."""
    from torchtitan_like.checkpoint import create_seed_checkpoint

    monkeypatch.setattr(FileSystem, "create_stream", _full_disk_streams(room=1000))
    with pytest.raises(StorageError) as raised:  # was: CheckpointException "RuntimeError: ... unexpected pos"
        create_seed_checkpoint(checkpoint_config(), str(tmp_path), build_model())
    tmp = os.path.join(tmp_path, "checkpoint", "step-0.tmp")
    assert str(raised.value).startswith(f"saving the seed checkpoint failed: {tmp}: No space left on device (ENOSPC); ")
    assert "The partial step-0.tmp was removed" in str(raised.value)
    assert os.listdir(os.path.join(tmp_path, "checkpoint")) == []
