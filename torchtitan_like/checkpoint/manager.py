"""`CheckpointManager`: save and resume the whole training state with torch.distributed.checkpoint.

How the trainer uses it (every rank, same calls in the same order):

    checkpointer = CheckpointManager(config.checkpoint, config.job.dump_folder, model_parts, optimizer,
                                     lr_scheduler, dataloader, extra_states={"train_state": train_state},
                                     dp_rank=parallel_dims.dp_rank)   # constructor: checks the folder
    step = checkpointer.load()          # 0 when nothing to resume; else the restored step
    for step in range(step + 1, steps + 1):
        ...train one step...
        checkpointer.save(step, last=(step == steps))   # saves when due (interval) or last; every
                                                        # call also commits a finished async save
    checkpointer.close()                # waits for an in-flight async save and commits it

`save` writes into `step-N.tmp` and commits atomically (folders.py); `load` picks the newest complete
full checkpoint, skipping incomplete ones with a warning. Model, optimizer, LR scheduler, dataloader
position (per data-parallel rank), RNG states (per rank) and every `extra_states` entry are saved.
With `last_save_model_only` the final save writes, besides that step's full checkpoint, a model-only
export in `checkpoint.export_dtype` under `export/step-N`, which resuming never picks.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.stateful import Stateful

from torchtitan_like.checkpoint import folders
from torchtitan_like.checkpoint.fit import (check_model_shapes, check_optimizer_parameters, check_tied_weights_loaded,
                                            fit_to_checkpoint, global_model_shapes, global_names,
                                            optimizer_parameter_names, saved_keys, untie_for_loading)
from torchtitan_like.checkpoint.safe_storage import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchtitan_like.checkpoint.state import (DataloaderState, ModelState, OptimizerState, RNGState,
                                              check_excluded_states)
from torchtitan_like.checkpoint.writing import (CheckpointWriter, low_space_warning, raise_save_failure, resume_hint,
                                                save_failure, save_model_only)
from torchtitan_like.errors import ConfigError, StorageError
from torchtitan_like.fault_injection import maybe_inject_fault

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier(group=None) -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def _from_rank0(value: Any, group=None) -> Any:
    """Rank 0's `value` on every rank of `group` (a broadcast; `value` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


class PinnedStager(BlockingAsyncStager):
    """Stages async saves into pinned CPU buffers that are kept between saves.

    DCP's own cache (`BlockingAsyncStager(cache_staged_state_dict=True)`) reuses one buffer set
    only while the state's structure never changes; ours does change (the loss history and the
    dataloader blob grow), so buffers are cached per top-level state (model, optimizer, ...) and
    one is allocated again only when that state's tensor shapes or dtypes changed. The large
    states, model and optimizer, are pinned once per run.
    """

    def __init__(self):
        super().__init__(cache_staged_state_dict=True)
        self._buffers: dict[str, tuple[Any, Any]] = {}  # state name -> (layout, pinned copy)

    @staticmethod
    def _layout(value: Any) -> Any:
        if isinstance(value, dict):
            return tuple((key, PinnedStager._layout(item)) for key, item in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(PinnedStager._layout(item) for item in value)
        if isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            return ("tensor", tuple(value.shape), tuple(local.shape), value.dtype)
        return type(value)

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        staged = {}
        for name, value in state_dict.items():
            if not isinstance(value, dict):
                staged[name] = value
                continue
            layout = self._layout(value)
            cached = self._buffers.get(name)
            if cached is None or cached[0] != layout:
                cached = (layout, _create_cpu_state_dict(value, pin_memory=True))
                self._buffers[name] = cached
            staged[name] = _copy_state_dict(value, cached[1])
        return staged

    def close(self) -> None:
        self._buffers.clear()


class CheckpointManager:
    """Saves and loads the training state of this rank; see the module docstring for the call order."""

    def __init__(self, checkpoint_config, dump_folder: str, model_parts: nn.Module | Sequence[nn.Module],
                 optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None,
                 lr_scheduler: Any = None, dataloader: Any = None, extra_states: dict[str, Stateful] | None = None,
                 *, dp_rank: int | None = None, process_group: dist.ProcessGroup | None = None):
        self.config = checkpoint_config
        self.enabled = bool(checkpoint_config.enable)
        self.root = os.path.join(dump_folder, checkpoint_config.folder)
        parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
        self.model = ModelState(parts)
        self.optimizer = OptimizerState(parts, optimizer) if optimizer is not None else None
        self.lr_scheduler = lr_scheduler
        self.rank, self.world_size = _rank(), _world_size()
        self.dataloader = DataloaderState(dataloader, self.rank if dp_rank is None else dp_rank) if dataloader is not None else None
        self.rng = RNGState(self.rank)
        self.extra_states = dict(extra_states or {})
        self.process_group = process_group
        self._pending: tuple[Any, int, str, str] | None = None  # in-flight async save: future, step, paths
        self._async_group = None
        self._pinned_stager: PinnedStager | None = None

        check_excluded_states(checkpoint_config.exclude_from_loading, self.extra_states)
        if checkpoint_config.export_dtype not in EXPORT_DTYPES:
            raise ConfigError(f"checkpoint.export_dtype = {checkpoint_config.export_dtype!r}; allowed: "
                              f"{', '.join(EXPORT_DTYPES)}")
        if not self.enabled:
            return
        folders.ensure_writable(self.root)  # every rank: ranks may not share one file system
        if self.rank == 0:
            for name in folders.remove_stale_tmp(self.root) + folders.remove_stale_tmp(folders.export_root(self.root)):
                warnings.warn(f"removed {name} left by an earlier save that did not finish", stacklevel=2)
            self._warn_if_low_on_space()
        if checkpoint_config.async_mode != "disabled" and dist.is_available() and dist.is_initialized():
            # A separate gloo group: the background save thread must not share a communicator with
            # the training collectives (ordering), and DCP's async save needs a CPU backend.
            self._async_group = dist.new_group(backend="gloo")
        _barrier(self.process_group)

    # ------------------------------------------------------------------------------------ saving
    def should_save(self, step: int, last: bool = False, force: bool = False) -> bool:
        return self.enabled and (force or last or step % self.config.interval == 0)

    def _full_state(self, skip: set[str] = frozenset()) -> dict[str, Any]:
        """Every state to save, or the load templates of those not in `skip` (templates are not
        built for skipped states: building the optimizer's initializes its state)."""
        states: dict[str, Any] = {"model": self.model, "optimizer": self.optimizer, "lr_scheduler": self.lr_scheduler,
                                  "dataloader": self.dataloader, "rng": self.rng, **self.extra_states}
        return {name: stateful.state_dict() for name, stateful in states.items()
                if stateful is not None and name not in skip}

    def save(self, step: int, last: bool = False, force: bool = False) -> bool:
        """Save when due (every `interval` steps, or `last`), or now (`force`, e.g. on preemption);
        returns whether a save started. The trainer calls it every step, so every call first
        commits an async save that has finished meanwhile (no waiting, no collective): otherwise
        that checkpoint would stay a `.tmp` folder, which a crash before the next save loses.

        The last and forced saves are full and synchronous (the process is about to exit); with
        `last_save_model_only` the last save also writes the model alone in `export_dtype` to
        `export/step-N`, beside (never instead of) the full checkpoint, so the run stays resumable.
        """
        self.maybe_wait(block=False)
        if not self.should_save(step, last, force):
            return False
        self.maybe_wait()
        state = self._full_state()
        if self.config.async_mode != "disabled" and not last and not force:
            tmp_path, final_path = folders.tmp_folder(self.root, step), folders.step_folder(self.root, step)
            response = dcp.async_save(state, storage_writer=CheckpointWriter(tmp_path, self.rank, step),
                                      process_group=self._async_group, async_stager=self._stager())
            future = getattr(response, "upload_completion", response)
            self._pending = (future, step, tmp_path, final_path)
            return True
        self._save_now(state, self.root, step)
        if last and self.config.last_save_model_only:
            model = self.model.state_dict(dtype=EXPORT_DTYPES[self.config.export_dtype])
            self._save_now({"model": model}, folders.export_root(self.root), step, model_only=True)
        return True

    def _save_now(self, state: dict[str, Any], root: str, step: int, model_only: bool = False) -> None:
        """Write and commit on every rank. A failed write raises a StorageError on every rank
        (checkpoint/writing.py); so does a failed commit, whose outcome rank 0 sends to all."""
        tmp_path, final_path = folders.tmp_folder(root, step), folders.step_folder(root, step)
        action = f"saving the model-only export of step {step}" if model_only else f"saving checkpoint step {step}"
        outcome = functools.partial(self._after_failed_save, step, model_only)  # read only on a failure
        writer = CheckpointWriter(tmp_path, self.rank, None if model_only else step)
        try:
            dcp.save(state, storage_writer=writer, process_group=self.process_group)
        except CheckpointException as error:  # raised on every rank alike
            raise_save_failure(error, tmp_path, action, outcome)
        maybe_inject_fault(self.rank, step, "save")
        _barrier(self.process_group)
        failure = None
        if self.rank == 0:
            try:
                folders.commit(tmp_path, final_path, step, self.world_size, model_only)
            except OSError as error:
                failure = str(save_failure(error, tmp_path, f"committing {os.path.basename(final_path)}", outcome))
            else:
                if not model_only:
                    folders.apply_retention(self.root, self.config.keep_latest_k, keep_step=step)
                    self._warn_if_low_on_space()
        # Instead of a barrier: a rank waiting there for a commit that failed would wait for the
        # collective timeout, while rank 0 has stopped.
        failure = _from_rank0(failure, self.process_group)
        if failure is not None:
            raise StorageError(failure)

    def _after_failed_save(self, step: int, model_only: bool) -> str:
        """What is left to the run when the save of `step` failed."""
        if model_only:  # the export is written after the full checkpoint of the same step
            return (f"The full checkpoint {folders.step_folder(self.root, step)} was committed: the run is complete "
                    f"and resumable; only the model-only export is missing")
        return resume_hint(self.root)

    def _stager(self) -> BlockingAsyncStager | None:
        """The pinned-memory stager, built once and kept: its staging buffers are reused by every
        save (a stager made per save would allocate, and pin, a full copy of the state each time)."""
        if not self._use_pinned_memory():
            return None  # DCP stages into ordinary CPU memory
        if self._pinned_stager is None:
            self._pinned_stager = PinnedStager()
        return self._pinned_stager

    def _use_pinned_memory(self) -> bool:
        if self.config.async_mode != "async_with_pinned_mem":
            return False
        if not torch.cuda.is_available():
            warnings.warn("checkpoint.async_mode = 'async_with_pinned_mem' needs CUDA; saving asynchronously "
                          "without pinned memory", stacklevel=3)
            return False
        return True

    def maybe_wait(self, block: bool = True) -> None:
        """Finish an in-flight async save: wait for it (or, with block=False, only if it is done)
        and commit it on rank 0.

        Rank 0's save completes only after DCP has gathered every rank's write results and written
        the metadata, so rank 0 may commit without another collective (which could otherwise
        interleave with training collectives).
        """
        if self._pending is None:
            return
        future, step, tmp_path, final_path = self._pending
        if not block and not future.done():
            return
        self._pending = None
        outcome = functools.partial(resume_hint, self.root)
        try:
            future.result()  # a failed write raises here on every rank (checkpoint/writing.py)
        except CheckpointException as error:
            raise_save_failure(error, tmp_path, f"saving checkpoint step {step} asynchronously", outcome)
        if self.rank == 0:
            try:
                folders.commit(tmp_path, final_path, step, self.world_size, model_only=False)
            except OSError as error:
                # Rank 0 alone (no collective here, see above): the others stop at their next
                # collective, which fails once rank 0 has exited.
                raise_save_failure(error, tmp_path, f"committing {os.path.basename(final_path)}", outcome)
            folders.apply_retention(self.root, self.config.keep_latest_k, keep_step=step)
            self._warn_if_low_on_space()

    def _warn_if_low_on_space(self) -> None:
        """Rank 0, at start-up and after each commit: warn while the next save cannot fit (writing.py)."""
        message = low_space_warning(self.root)
        if message is not None:
            warnings.warn(message, stacklevel=3)

    def close(self) -> None:
        """Wait for and commit any in-flight async save; call once before the process exits."""
        self.maybe_wait()
        if self._pinned_stager is not None:
            self._pinned_stager.close()
            self._pinned_stager = None
        if self._async_group is not None:
            dist.destroy_process_group(self._async_group)
            self._async_group = None

    # ----------------------------------------------------------------------------------- loading
    def load(self, step: int = -1) -> int:
        """Restore the newest complete full checkpoint (or `step`, or `checkpoint.load_step`).

        Returns the step training continues from: the restored step, or 0 when there is nothing
        to resume or only the model was loaded (a model-only checkpoint restores no train state).
        When the run's folder has no checkpoint, `initial_load_path` (if set) initializes the model
        (and, unless `initial_load_model_only`, the rest).
        """
        if not self.enabled:
            return 0
        self.maybe_wait()
        if self._async_group is not None:
            # Rank 0 commits an async save after the other ranks' waits end: none may list the
            # folders before that commit, or ranks would load different checkpoints.
            _barrier(self.process_group)
        choice = folders.choose_checkpoint(self.root, self.config, step)
        if choice is None:
            return 0
        self._load_folder(choice.folder, choice.model_only)
        return 0 if choice.model_only else choice.folder.step

    def _load_folder(self, folder: folders.CheckpointFolder, model_only: bool) -> None:
        metadata = read_metadata(folder.path)
        excluded = set(self.config.exclude_from_loading)
        model_state = self.model.state_dict()
        check_model_shapes(global_model_shapes(model_state, self.process_group), metadata, folder.path)
        tied = untie_for_loading(model_state)
        state: dict[str, Any] = {"model": model_state}
        if not model_only:
            for name, value in self._full_state(skip=excluded | {"model"}).items():
                if name in ("optimizer", "lr_scheduler"):
                    state[name] = value
                elif name == "dataloader":  # this rank's key, or another rank's when the dp degree grew
                    template = self.dataloader.load_template(saved_keys(metadata, name))
                    state[name] = fit_to_checkpoint(template, metadata, name, name)
                else:
                    state[name] = fit_to_checkpoint(value, metadata, name, name)
        if "optimizer" in state:
            check_optimizer_parameters(global_names(optimizer_parameter_names(state["optimizer"], "state."),
                                                    self.process_group), metadata, folder.path)
        dcp.load(state, storage_reader=SafeFileSystemReader(folder.path), planner=SafeLoadPlanner(),
                 process_group=self.process_group)
        if tied:
            check_tied_weights_loaded(state["model"], folder.path, self.process_group)
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        if "lr_scheduler" in state:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "dataloader" in state:
            if state["dataloader"]:
                self.dataloader.load_state_dict(state["dataloader"])
            else:
                warnings.warn(f"{folder.path} has no dataloader state: the data starts from the beginning",
                              stacklevel=3)
        if "rng" in state and self.rng.key in state["rng"]:
            self.rng.load_state_dict(state["rng"])
        for name, stateful in self.extra_states.items():
            if name in state:
                stateful.load_state_dict(state[name])


def create_seed_checkpoint(checkpoint_config, dump_folder: str, model_parts: nn.Module | Sequence[nn.Module]) -> str:
    """Write the freshly initialized model as a model-only `step-0` from one process.

    Every parallel plan can load it: DCP reshards the full tensors into whatever layout the loading
    run uses, and `load()` restores only the model from a model-only checkpoint. Returns its folder.
    """
    if _world_size() != 1:
        raise ConfigError("checkpoint.create_seed_checkpoint runs on a single process; launch it with "
                          "one rank (e.g. NGPU=1) and all parallelism degrees 1")
    root = os.path.join(dump_folder, checkpoint_config.folder)
    parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)
    return save_model_only(ModelState(parts).state_dict(), root, 0, "saving the seed checkpoint")
