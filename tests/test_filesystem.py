"""Writes that fail clearly (torchtitan_like/filesystem.py): a file written whole or not at all, the
trainer's config.toml on a full disk, and the messages that name the path and the free space."""

import errno
import os
from types import SimpleNamespace

import pytest

from tests.helpers import REPO_ROOT
from torchtitan_like import filesystem
from torchtitan_like.filesystem import find_os_error, storage_error, write_text_atomically


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_an_atomic_write_that_fails_leaves_the_previous_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "config.toml"
    path.write_text("the run's config")
    monkeypatch.setattr(filesystem.os, "fsync", _no_space)  # e.g. NFS reports a full disk at fsync
    with pytest.raises(OSError) as raised:
        write_text_atomically(path, "another config")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    monkeypatch.undo()
    assert path.read_text() == "the run's config"  # open(path, "w") would have emptied it
    assert os.listdir(tmp_path) == ["config.toml"]


def test_the_trainer_warns_when_its_config_toml_cannot_be_written_and_keeps_the_old_one(tmp_path, monkeypatch):
    from torchtitan_like import trainer
    from torchtitan_like.config import load_config

    config, _ = load_config(["--config", os.path.join(REPO_ROOT, "train_configs", "debug_model.toml"),
                             "--job.dump_folder", str(tmp_path)])
    (tmp_path / "config.toml").write_text("the run's config")
    warnings = []
    monkeypatch.setattr(trainer.logger, "warning", warnings.append)
    monkeypatch.setattr(filesystem.os, "fsync", _no_space)
    trainer.Trainer._write_config(SimpleNamespace(rank=0, config=config))  # returns: training goes on
    monkeypatch.undo()
    [warning] = warnings
    assert warning.startswith(f"could not write {tmp_path / 'config.toml'}: No space left on device (ENOSPC); ")
    assert " free of " in warning and "training goes on" in warning
    assert (tmp_path / "config.toml").read_text() == "the run's config"


def test_the_os_error_behind_a_library_error_is_found_and_reported_with_the_free_space(tmp_path):
    try:
        try:
            _no_space()
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as error:  # how torch.save reports a full disk
        assert find_os_error(error).errno == errno.ENOSPC
    rust = find_os_error(ValueError("Error while serializing: I/O error: Disk quota exceeded (os error 122)"))
    assert rust.errno == errno.EDQUOT
    assert find_os_error(RuntimeError("a bug")) is None
    message = str(storage_error("writing a shard", tmp_path / "missing" / "shard.bin", rust, "Nothing was changed"))
    assert message.startswith(f"writing a shard failed: {tmp_path / 'missing' / 'shard.bin'}: Disk quota exceeded "
                              f"(EDQUOT); ")
    assert " free of " in message and message.endswith("(the quota, not the disk, is exhausted). Nothing was changed")
