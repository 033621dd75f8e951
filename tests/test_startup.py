"""Start-up checks (startup.check_user_inputs, what `train --check-config` runs in one process before
torchrun): every mistake the trainer would refuse later, once the process group, data and model
exist, must stop here instead."""

from __future__ import annotations

import pytest

from tests.helpers import tiny_overrides
from torchtitan_like.config import load_config
from torchtitan_like.errors import ConfigError
from torchtitan_like.startup import check_user_inputs


@pytest.mark.parametrize("overrides, world_size, message", [
    (["--checkpoint.enable", "--checkpoint.exclude_from_loading", '["optimzer"]'], 1,
     r"exclude_from_loading: 'optimzer' is not an excludable state \(did you mean \"optimizer\"\?\)"),
    (["--checkpoint.exclude_from_loading", '["model"]'], 1, "'model' is not an excludable state"),
    (["--checkpoint.enable", "--checkpoint.create_seed_checkpoint"], 2,
     "create_seed_checkpoint = true runs on a single process; this run has 2"),
    (["--checkpoint.enable", "--checkpoint.initial_load_path", "{tmp}/missing"], 1,
     "initial_load_path = '.*/missing' does not exist"),
])
def test_checkpoint_mistakes_the_trainer_refuses_are_refused_at_start_up(tmp_path, overrides, world_size, message):
    config, _ = load_config(tiny_overrides(str(tmp_path / "run")) + [item.format(tmp=tmp_path) for item in overrides])
    with pytest.raises(ConfigError, match=message):
        check_user_inputs(config, world_size)


def test_a_missing_initial_load_path_is_no_mistake_for_a_run_that_resumes_from_its_own_checkpoint(tmp_path):
    # The path is read only when the run's folder has no checkpoint; a requeued run must not stop.
    (tmp_path / "run" / "checkpoint" / "step-2").mkdir(parents=True)
    config, _ = load_config(tiny_overrides(str(tmp_path / "run")) + [
        "--checkpoint.enable", "--checkpoint.initial_load_path", str(tmp_path / "deleted_seed")])
    assert check_user_inputs(config, world_size=1).parallel_dims is not None
    config.checkpoint.exclude_from_loading = ["optimizer", "dataloader", "train_state"]
    assert check_user_inputs(config, world_size=1).parallel_dims is not None
    # The same path for a run with no checkpoint of its own is the mistake the check is there for.
    (tmp_path / "run" / "checkpoint" / "step-2").rmdir()
    with pytest.raises(ConfigError, match="initial_load_path"):
        check_user_inputs(config, world_size=1)
