"""Will the run's checkpoint load? Asked by `train --check-config`, in one process before torchrun.

A relaunch whose config its own checkpoint cannot resume (another model flavor or shape, a tied LM
head against an untied one, another training.seq_len, seed or corpus for the data position) is
refused at load time on every rank, after the process group and the model exist. This asks the
same of the checkpoint `CheckpointManager.load` would pick (folders.choose_checkpoint), with the
load's own checks and messages (fit.py; data/sampler.py through data/dataloader.py), so the mistake
is reported once, early. It reads the checkpoint's DCP metadata and one small dataloader blob, never
a tensor of the model or optimizer. A checkpoint the check cannot read is left to the load, which
skips or reports it.

Only `--check-config` runs it, not every rank of the trainer: thousands of ranks reading the
metadata at once, and again at load, would cost more than the load-time refusal saves them.
"""

from __future__ import annotations

import os
import warnings

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan_like.checkpoint import folders
from torchtitan_like.checkpoint.fit import (check_model_shapes, check_optimizer_parameters, fit_to_checkpoint,
                                            saved_keys)
from torchtitan_like.checkpoint.safe_storage import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchtitan_like.checkpoint.state import DataloaderState, ModelState, decode_blob
from torchtitan_like.data.dataloader import check_saved_position
from torchtitan_like.errors import DataError
from torchtitan_like.startup import build_model_on_meta


def check_checkpoint_fits(config, checked) -> folders.LoadChoice | None:
    """UserError (exit 2) when the checkpoint this run would load does not fit its config; returns
    that checkpoint (None when the run starts fresh or checkpointing is off). `checked` is what
    startup.check_user_inputs resolved (tokenizer, model spec and arguments, parallel dims)."""
    checkpoint = config.checkpoint
    if not checkpoint.enable or checkpoint.create_seed_checkpoint:  # a seed-checkpoint run loads nothing
        return None
    # Damaged folders are skipped here without a word: the load warns about them.
    choice = folders.choose_checkpoint(os.path.join(config.job.dump_folder, checkpoint.folder), checkpoint,
                                       warn=False)
    if choice is None:
        return None
    path = choice.folder.path
    metadata = read_metadata(path)  # already read once by the completeness check: it is readable
    model = build_model_on_meta(config, checked.spec, checked.model_args, checked.parallel_dims)
    # The whole model's names and shapes: what global_model_shapes gathers over the ranks at load.
    shapes = {name: tuple(value.shape) for name, value in ModelState([model]).state_dict().items()}
    check_model_shapes(shapes, metadata, path)
    if choice.model_only:
        return choice
    excluded = set(checkpoint.exclude_from_loading)
    if "optimizer" not in excluded:
        # The optimizer holds one state per Parameter, named as the model names it; a tied LM head
        # is one Parameter (under its first name), which tells a tied checkpoint from an untied one.
        check_optimizer_parameters({name for name, _ in model.named_parameters()}, metadata, path)
    if "dataloader" not in excluded:
        state = _saved_dataloader_state(metadata, path)
        if state is not None:
            check_saved_position(config, checked.tokenizer, state)
    return choice


def _saved_dataloader_state(metadata, path: str):
    """One data-parallel rank's saved loader state (all hold the same seq_len, seed and corpus
    size), read alone from the checkpoint in this process; None when it has none or it is unreadable."""
    template = DataloaderState(None, dp_rank=0).load_template(saved_keys(metadata, "dataloader"))
    if not template:
        return None
    key = next(iter(template))
    state = {"dataloader": fit_to_checkpoint(template, metadata, "dataloader", "dataloader")}
    try:
        with warnings.catch_warnings():  # DCP's note that it reads in one process: so it does, on purpose
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
        return decode_blob(state["dataloader"][key])
    except (CheckpointException, DataError, OSError, RuntimeError, ValueError, TypeError, KeyError):
        return None  # the load reads it again and reports what is wrong with it
