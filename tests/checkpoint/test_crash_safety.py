"""Never losing a run (folders.py, manager.py): retention, a replacement of a step cut off
mid-way, checkpoints of a deeper model, loading right after an async save on several ranks, and
ranks of several nodes probing the shared checkpoint folder."""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

from tests.checkpoint.common import build_model, build_training, checkpoint_config, run_on_ranks, tiny_args
from tests.checkpoint.test_manager import _write_model_only
from torchtitan_like.checkpoint import CheckpointManager, folders
from torchtitan_like.errors import UserError

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _manager(dump, model=None, optimizer=True, **config):
    model = model if model is not None else build_model()
    optimizer, scheduler = build_training(model) if optimizer else (None, None)
    return CheckpointManager(checkpoint_config(**config), str(dump), model, optimizer, scheduler)


def _steps(dump) -> list[str]:
    return sorted(os.listdir(os.path.join(dump, "checkpoint")))


def test_retention_keeps_the_step_just_saved_by_a_run_resumed_from_an_older_step(tmp_path):
    writer = _manager(tmp_path)
    for step in (2, 4, 6):
        writer.save(step)
    resumed = _manager(tmp_path, keep_latest_k=2, load_step=2)
    assert resumed.load() == 2
    assert resumed.save(3)
    assert "step-3" in _steps(tmp_path)  # was deleted at once: [4, 6] are the newest two by step
    assert _manager(tmp_path, load_step=3).load() == 3


def test_a_model_only_step_folder_does_not_push_the_full_checkpoints_out_of_retention(tmp_path):
    _manager(tmp_path).save(2)
    _write_model_only(tmp_path / "checkpoint", 4, build_model())  # an older version's final save
    extended = _manager(tmp_path, keep_latest_k=1)
    with pytest.warns(UserWarning, match="step-4 holds model weights only"):
        assert extended.load() == 2
    extended.save(3)
    assert "step-3" in _steps(tmp_path)
    with pytest.warns(UserWarning, match="step-4 holds model weights only"):
        assert _manager(tmp_path, keep_latest_k=1).load() == 3  # not 0: the run is not lost


def test_a_save_cut_off_while_replacing_a_step_leaves_that_step_loadable(tmp_path, monkeypatch):
    manager = _manager(tmp_path, keep_latest_k=1)
    manager.save(4)  # e.g. the interval save; the preemption save of the same step replaces it
    real_rename = os.rename

    class Killed(BaseException):
        pass

    def rename(source, destination):
        if str(source).endswith("step-4.tmp") and str(destination).endswith("step-4"):
            raise Killed  # between moving the old step-4 aside and moving the new one in
        return real_rename(source, destination)

    monkeypatch.setattr(folders.os, "rename", rename)
    with pytest.raises(Killed):
        manager.save(4, force=True)
    monkeypatch.setattr(folders.os, "rename", real_rename)
    assert "step-4" not in _steps(tmp_path)
    with pytest.warns(UserWarning, match="restored .*step-4"):
        restarted = _manager(tmp_path, keep_latest_k=1)  # start-up clean-up deleted both copies
    assert restarted.load() == 4
    assert _steps(tmp_path) == ["step-4"]


def test_a_checkpoint_of_a_model_with_more_layers_is_a_user_error(tmp_path):
    _manager(tmp_path, build_model(tiny_args(n_layers=4))).save(3)
    with pytest.raises(UserError, match=r"9 tensor\(s\) of the checkpoint not in the model: layers\.3\."):
        _manager(tmp_path, build_model(tiny_args(n_layers=3))).load()


@pytest.mark.parametrize("saved_tied", [True, False], ids=["tied_into_untied", "untied_into_tied"])
def test_a_checkpoint_of_the_other_embedding_tying_is_a_user_error(tmp_path, saved_tied):
    # Both flavors' state dicts hold tok_embeddings.weight and output.weight, so the model shapes
    # match; the optimizer's parameters do not (a tied model has one Parameter for both). Before:
    # tied into untied failed inside DCP ("Missing key ... optimizer.state.output.weight.step"),
    # untied into tied loaded two matrices into one Parameter without a word.
    from tests.checkpoint.common import train_step

    saved = build_model(tiny_args(tie_word_embeddings=saved_tied))
    optimizer, scheduler = build_training(saved)
    train_step(saved, optimizer, scheduler)
    CheckpointManager(checkpoint_config(), str(tmp_path), saved, optimizer, scheduler).save(1)
    with pytest.raises(UserError, match=r"output\.weight") as error:
        _manager(tmp_path, build_model(tiny_args(tie_word_embeddings=not saved_tied))).load()
    assert "exclude_from_loading" in str(error.value)
    model = build_model(tiny_args(tie_word_embeddings=not saved_tied))
    fresh_optimizer = _manager(tmp_path, model, exclude_from_loading=["optimizer"])
    if saved_tied:  # the untied model starts its head from the tied matrix: a legitimate start
        assert fresh_optimizer.load() == 1
        assert model.output.weight is not model.tok_embeddings.weight
        assert torch.equal(model.output.weight, saved.tok_embeddings.weight)
    else:  # a tied model cannot hold two matrices: refused from the weights themselves
        with pytest.raises(UserError, match="untied LM head"):
            fresh_optimizer.load()


def _stage(n_layers: int, rank: int, world_size: int):
    """This rank's pipeline stage of an n-layer model: a contiguous range of layers, the embedding on
    the first stage, the norm and output on the last (as models/llama3/pipeline.py splits)."""
    model = build_model(tiny_args(n_layers=n_layers))
    per_stage = n_layers // world_size
    for index in range(n_layers):
        if index // per_stage != rank:
            del model.layers[str(index)]
    if rank != 0:
        model.tok_embeddings = None
    if rank != world_size - 1:
        model.norm, model.output = None, None
    return model


def _load_stages_of_another_depth(rank, world_size, dump):
    warnings.simplefilter("ignore")
    _manager(os.path.join(dump, "four"), _stage(4, rank, world_size), optimizer=False).save(1)
    _manager(os.path.join(dump, "two"), _stage(2, rank, world_size), optimizer=False).save(1)
    # Each stage holds only its own layers: the other stages' are not "unexpected".
    own_step = _manager(os.path.join(dump, "two"), _stage(2, rank, world_size), optimizer=False).load()
    # Layers 2 and 3 belong to no stage: every rank raises (none goes on into the collective load).
    four = _manager(os.path.join(dump, "four"), _stage(2, rank, world_size), optimizer=False)
    try:
        four.load()
        error = None
    except UserError as raised:
        error = str(raised)
    with open(os.path.join(dump, f"rank{rank}.txt"), "w") as handle:
        handle.write(f"{own_step}\n{error}")


def test_pipeline_stages_reject_a_deeper_checkpoint_on_every_rank_and_load_their_own(tmp_path):
    run_on_ranks(_load_stages_of_another_depth, 2, str(tmp_path), timeout=90)
    for rank in range(2):
        own_step, error = (tmp_path / f"rank{rank}.txt").read_text().split("\n", 1)
        assert own_step == "1", rank
        assert "layers.2.attention.wq.weight" in error and "layers.3." in error, (rank, error)


def _load_right_after_an_async_save(rank, world_size, dump):
    warnings.simplefilter("ignore")
    if rank == 0:  # a slow commit (a busy file system): the other rank is done waiting long before
        real_commit = folders.commit

        def slow_commit(*args, **kwargs):
            time.sleep(1.0)
            return real_commit(*args, **kwargs)

        folders.commit = slow_commit
    manager = _manager(dump, async_mode="async", interval=2)
    manager.save(2)
    loaded = manager.load()
    manager.close()
    with open(os.path.join(dump, f"loaded_rank{rank}.txt"), "w") as handle:
        handle.write(str(loaded))


def test_load_after_an_async_save_picks_the_same_checkpoint_on_every_rank(tmp_path):
    run_on_ranks(_load_right_after_an_async_save, 2, str(tmp_path), timeout=90)
    # before: rank 1 saw only step-2.tmp and started afresh (and rank 0 hung)
    assert [(tmp_path / f"loaded_rank{rank}.txt").read_text() for rank in range(2)] == ["2", "2"]


def test_ranks_with_the_same_pid_probe_a_shared_folder_at_once(tmp_path, monkeypatch):
    """Ranks of other nodes write the same folder and may have the same pid (a container per node):
    one rank probing while another is between writing and removing its probe is not an error."""
    real_remove, nested = os.remove, []

    def remove(path):
        if not nested:
            nested.append(path)
            folders.ensure_writable(str(tmp_path))  # the other node's rank, same pid, meanwhile
        return real_remove(path)

    monkeypatch.setattr(folders.os, "remove", remove)
    folders.ensure_writable(str(tmp_path))  # was: ConfigError "not writable (No such file or directory)"
    assert nested and not os.listdir(tmp_path)
