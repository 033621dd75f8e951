"""Checkpoint folders: atomic commit, skipping half-written checkpoints, retention, stale saves."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from tests.checkpoint.common import build_model, build_training, checkpoint_config
from torchtitan_like.checkpoint import CheckpointManager
from torchtitan_like.checkpoint import folders
from torchtitan_like.errors import StorageError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _manager(root, model, **config):
    optimizer, scheduler = build_training(model)
    return CheckpointManager(checkpoint_config(**config), str(root), model, optimizer, scheduler)


def _save_steps(root, steps, **config):
    model = build_model()
    manager = _manager(root, model, **config)
    for step in steps:
        with torch.no_grad():
            model.norm.weight.fill_(float(step))  # tells the loaded step apart
        manager.save(step)
    return manager


def _loaded_norm(root) -> float:
    model = build_model(seed=9)
    _manager(root, model).load()
    return float(model.norm.weight[0].detach())


def test_committed_folder_has_marker_listing_every_file_with_its_size(tmp_path):
    _save_steps(tmp_path, [1])
    folder = tmp_path / "checkpoint" / "step-1"
    marker = json.loads((folder / folders.COMPLETE_MARKER).read_text())
    assert marker["step"] == 1 and marker["world_size"] == 1 and not marker["model_only"]
    assert marker["files"] == {name: os.path.getsize(folder / name) for name in os.listdir(folder)
                               if name != folders.COMPLETE_MARKER}
    assert ".metadata" in marker["files"]


@pytest.mark.parametrize("damage", ["no_marker", "truncated_file", "missing_file", "bad_metadata"])
def test_damaged_newest_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, damage):
    _save_steps(tmp_path, [1, 2])
    newest = tmp_path / "checkpoint" / "step-2"
    data_file = next(name for name in os.listdir(newest) if name.endswith(".distcp"))
    if damage == "no_marker":
        os.remove(newest / folders.COMPLETE_MARKER)
    elif damage == "truncated_file":
        os.truncate(newest / data_file, os.path.getsize(newest / data_file) // 2)
    elif damage == "missing_file":
        os.remove(newest / data_file)
    else:  # metadata replaced by garbage of the same size: sizes match, content does not
        size = os.path.getsize(newest / ".metadata")
        (newest / ".metadata").write_bytes(b"\x80" * size)
    with pytest.warns(UserWarning, match="step-2"):
        assert _loaded_norm(tmp_path) == 1.0


def test_save_in_progress_tmp_folder_is_never_loaded(tmp_path):
    _save_steps(tmp_path, [1, 2])
    root = tmp_path / "checkpoint"
    model = build_model(seed=9)
    manager = _manager(tmp_path, model)  # constructed first: start-up clean-up must not hide the case
    os.rename(root / "step-2", root / "step-3.tmp")  # looks complete inside, but was never committed
    assert manager.load() == 1 and float(model.norm.weight[0].detach()) == 1.0


def test_keep_latest_k_deletes_only_older_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoint"
    _save_steps(tmp_path, [1, 2])
    os.remove(root / "step-1" / folders.COMPLETE_MARKER)  # incomplete: must survive retention
    _save_steps(tmp_path, [3, 4, 5], keep_latest_k=2)
    assert sorted(os.listdir(root)) == ["step-1", "step-4", "step-5"]


def test_stale_tmp_folders_of_a_crashed_save_are_removed_at_start_up(tmp_path):
    root = tmp_path / "checkpoint"
    (root / "step-7.tmp").mkdir(parents=True)
    (root / "step-7.tmp" / "__0_0.distcp").write_bytes(b"partial")
    with pytest.warns(UserWarning, match="step-7.tmp"):
        _manager(tmp_path, build_model())
    assert not (root / "step-7.tmp").exists()


def test_saving_a_step_again_replaces_it_atomically(tmp_path):
    _save_steps(tmp_path, [2, 2])
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-2"]
    assert _loaded_norm(tmp_path) == 2.0


def test_a_replacement_whose_final_rename_fails_puts_the_old_copy_back(tmp_path, monkeypatch):
    model = build_model()
    manager = _manager(tmp_path, model)
    with torch.no_grad():
        model.norm.weight.fill_(4.0)
    manager.save(4)
    with torch.no_grad():
        model.norm.weight.fill_(5.0)  # the replacement differs
    real_rename = os.rename

    def rename(source, destination):
        if str(source).endswith("step-4.tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_rename(source, destination)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(StorageError, match=r"committing step-4 failed: .*Input/output error \(EIO\)"):
        manager.save(4, force=True)  # e.g. the preemption save of a step the interval save wrote
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "checkpoint")) == ["step-4"]  # no step-4.replaced.tmp, no step-4.tmp
    assert _loaded_norm(tmp_path) == 4.0  # the old copy, complete
