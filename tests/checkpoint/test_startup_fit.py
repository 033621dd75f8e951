"""`train --check-config` refuses a relaunch that its own checkpoint cannot resume (another model
shape or tying, another seq_len or seed for the data position) with the load's own message, in one
process before torchrun, and writes nothing; `exclude_from_loading` and `initial_load_path` are
followed as the load follows them (checkpoint/startup_fit.py)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from tests.helpers import tiny_overrides
from torchtitan_like.checkpoint import TRAIN_STATE_KEY, CheckpointManager, TrainState
from torchtitan_like.config import load_config
from torchtitan_like.data import build_dataloader
from torchtitan_like.errors import UserError
from torchtitan_like.startup import check_user_inputs
from torchtitan_like.train import main

CHECKPOINT = ["--checkpoint.enable", "--checkpoint.last_save_model_only", "false"]


def _build_run(config) -> CheckpointManager:
    """The trainer's checkpointed states for `config` on one CPU process (a real model, optimizer
    and data loader one batch in), without the process group."""
    checked = check_user_inputs(config, world_size=1)
    model = checked.spec.model_cls(checked.model_args)
    model.init_weights(seed=config.training.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    dataloader = build_dataloader(config, checked.tokenizer, 0, 1)
    next(iter(dataloader))
    return CheckpointManager(config.checkpoint, config.job.dump_folder, model, optimizer, dataloader=dataloader,
                             extra_states={TRAIN_STATE_KEY: TrainState()})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> str:
    """A run folder whose checkpoint step-2 was saved with the tiny debug config (seq_len 32, seed 0)."""
    dump = str(tmp_path_factory.mktemp("startup_fit") / "run")
    config, _ = load_config(tiny_overrides(dump) + CHECKPOINT)
    _build_run(config).save(2, force=True)
    return dump


def _snapshot(folder: str) -> dict[str, float]:
    return {os.path.join(base, name): os.stat(os.path.join(base, name)).st_mtime_ns
            for base, dirs, files in os.walk(folder) for name in dirs + files}


def _check_config(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["--check-config", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _load_time_error(args: list[str]) -> str:
    """The UserError the trainer's CheckpointManager.load raises for this relaunch."""
    config, _ = load_config(args)
    with pytest.raises(UserError) as refusal:
        _build_run(config).load()
    return str(refusal.value)


@pytest.mark.parametrize("change, named", [
    (["--model.vocab_size", "512"], "tok_embeddings.weight: checkpoint (258, 256) vs model (512, 256)"),
    (["--model.flavor", "debugmodel_tied"], "optimizer state for parameters this run does not have: output.weight"),
    (["--training.seq_len", "64"], "seq_len=32, but this run has seq_len=64 (training.seq_len)"),
    (["--training.seed", "7"], "seed=0, but this run has seed=7 (training.seed)"),
], ids=["vocab_size", "tied_flavor", "seq_len", "seed"])
def test_check_config_refuses_a_relaunch_its_checkpoint_cannot_resume_with_the_load_message(
        saved_run, capsys, change, named):
    args = tiny_overrides(saved_run) + CHECKPOINT + change
    before = _snapshot(saved_run)
    code, out, err = _check_config(args, capsys)
    assert code == 2, out + err
    assert _snapshot(saved_run) == before  # nothing written, not even config.toml
    assert "config OK" not in out
    assert err.count("error:") == 1 and err.startswith("error: ")
    assert named in err
    # The very message the load gives on every rank once the process group and the model exist.
    assert err.strip() == f"error: {_load_time_error(args)}"


def test_check_config_passes_a_compatible_relaunch_and_names_the_checkpoint(saved_run, capsys):
    code, out, err = _check_config(tiny_overrides(saved_run, steps=8) + CHECKPOINT, capsys)
    assert code == 0, err
    assert f"checkpoint {os.path.join(saved_run, 'checkpoint', 'step-2')} fits" in out


def test_check_config_leaves_the_data_position_alone_when_the_dataloader_is_excluded(saved_run, capsys):
    excluded = ["--checkpoint.exclude_from_loading", '["dataloader"]']
    code, out, err = _check_config(tiny_overrides(saved_run) + CHECKPOINT + excluded + ["--training.seq_len", "64"],
                                   capsys)
    assert code == 0, err
    assert "step-2 fits" in out


def test_check_config_checks_initial_load_path_of_a_fresh_run_model_only_when_asked(saved_run, tmp_path, capsys):
    seed = ["--checkpoint.initial_load_path", os.path.join(saved_run, "checkpoint")]
    fresh = tiny_overrides(str(tmp_path / "fresh")) + CHECKPOINT + seed
    code, _, err = _check_config(fresh + ["--model.vocab_size", "512"], capsys)
    assert code == 2 and "tok_embeddings.weight: checkpoint (258, 256) vs model (512, 256)" in err
    # Weights alone (the default): the data position is not read, so another seq_len is no mistake.
    code, out, err = _check_config(fresh + ["--training.seq_len", "64"], capsys)
    assert code == 0, err
    code, _, err = _check_config(fresh + ["--training.seq_len", "64", "--checkpoint.initial_load_model_only", "false"],
                                 capsys)
    assert code == 2 and "seq_len=32, but this run has seq_len=64" in err
    assert not os.path.exists(tmp_path / "fresh" / "checkpoint")


def test_check_config_leaves_an_unreadable_data_position_to_the_load(saved_run, tmp_path, capsys):
    damaged = str(tmp_path / "damaged")
    shutil.copytree(saved_run, damaged)
    step = os.path.join(damaged, "checkpoint", "step-2")
    for name in os.listdir(step):  # zeros of the same size: the marker still says complete
        if name.endswith(".distcp"):
            with open(os.path.join(step, name), "r+b") as data_file:
                data_file.write(bytes(os.path.getsize(os.path.join(step, name))))
    code, out, err = _check_config(tiny_overrides(damaged) + CHECKPOINT + ["--training.seq_len", "64"], capsys)
    assert code == 0, err
    assert "step-2 fits" in out
