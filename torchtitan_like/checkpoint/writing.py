"""Writing checkpoint folders, and what a failed write (a full disk, an I/O error) says and leaves.

DCP runs every rank's writes inside two collectives: "plan" (each rank creates `step-N.tmp`) and
"write" (each rank writes its files, then the coordinator writes `.metadata`). Each gathers every
rank's exception and raises one `CheckpointException` on all ranks, and only after every rank's part
of that step has ended. So when a write fails on any rank, synchronous or async, every rank learns it
at the same collective, none is still writing into `step-N.tmp`, and none waits in a barrier for
the others. Then every rank removes `step-N.tmp` (on a shared file system removing it from several
ranks at once is harmless; on node-local disks each node removes its own copy), which gives the
space back, and raises the same `StorageError`: the failed step, the rank(s) and their OS error, the
free space left, and the newest complete checkpoint, which nothing touched (retention runs only
after a commit) and from which a relaunch resumes. A failure that is not the file system's (a
bug) is re-raised as DCP reported it, after the same clean-up.

The commit (marker file, rename) runs on rank 0 alone; manager.py sends its outcome to every rank.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Callable, Iterator, NoReturn

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException

from torchtitan_like.checkpoint import folders
from torchtitan_like.fault_injection import maybe_inject_write_error
from torchtitan_like.filesystem import find_os_error, format_bytes, storage_error


@contextlib.contextmanager
def _raising_the_os_error(path) -> Iterator[None]:
    """Re-raise a failure caused by the file system as a plain OSError naming `path` (unless it names
    its file). torch.save reports a full disk as `RuntimeError: ... unexpected pos`, with the OSError
    only in its __context__, which DCP drops when it sends each rank's exception to the others."""
    try:
        yield
    except BaseException as error:
        os_error = find_os_error(error)
        if os_error is None or (os_error is error and error.filename is not None):
            raise
        raise OSError(os_error.errno, os_error.strerror, os_error.filename or os.fspath(path)) from error


class CheckpointWriter(FileSystemWriter):
    """DCP's FileSystemWriter whose failures are the OSError behind them (see above); with `step`
    given it also fires the `enospc` fault of fault_injection.py for `rank`."""

    def __init__(self, path: str, rank: int = 0, step: int | None = None):
        super().__init__(path)
        self._fault_rank, self._fault_step = rank, step

    def prepare_local_plan(self, plan):  # creates the folder
        with _raising_the_os_error(self.path):
            return super().prepare_local_plan(plan)

    def write_data(self, plan, planner):
        with _raising_the_os_error(self.path):
            written = super().write_data(plan, planner)
            if self._fault_step is not None:
                maybe_inject_write_error(self._fault_rank, self._fault_step, os.fspath(self.path))
        return written

    def finish(self, metadata, results) -> None:  # the coordinator's .metadata
        with _raising_the_os_error(self.path):
            super().finish(metadata, results)


def _os_errors(error: BaseException) -> dict[int | None, OSError]:
    """The file-system errors behind a failed save: per rank for DCP's CheckpointException."""
    if isinstance(error, CheckpointException):
        found = {rank: find_os_error(failure[0]) for rank, failure in error.failures.items()}
        return {rank: os_error for rank, os_error in found.items() if os_error is not None}
    os_error = find_os_error(error)
    return {} if os_error is None else {None: os_error}


def save_failure(error: BaseException, tmp_path: str, action: str, outcome: Callable[[], str]) -> BaseException:
    """After a failed save or commit: remove `tmp_path`, then return a StorageError ('<action> [on rank R]
    failed: <path>: <OS error>; <free space>. <outcome()>') when the file system is behind `error`,
    else `error` itself (a bug keeps DCP's report)."""
    shutil.rmtree(tmp_path, ignore_errors=True)
    failures = _os_errors(error)
    if not failures:
        return error
    ranks = sorted(rank for rank in failures if rank is not None)
    if ranks and dist.is_available() and dist.is_initialized():  # one process: no rank to name
        action += f" on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
    first = failures[ranks[0]] if ranks else failures[None]
    removed = (f"The partial {os.path.basename(tmp_path)} could not be removed: delete it to free its space"
               if os.path.exists(tmp_path) else f"The partial {os.path.basename(tmp_path)} was removed")
    return storage_error(action, tmp_path, first, f"{removed}. {outcome()}".strip(". "))


def raise_save_failure(error: BaseException, tmp_path: str, action: str, outcome: Callable[[], str]) -> NoReturn:
    """`save_failure`, raised: call it in the `except` of the failed save."""
    failure = save_failure(error, tmp_path, action, outcome)
    if failure is error:
        raise error
    raise failure from error


def resume_hint(root: str) -> str:
    """What a relaunch of the run resumes from, after a failed save under `root`."""
    full = [folder for folder in folders.complete_checkpoints(root, warn=False) if not folder.model_only]
    if not full:
        return "No complete checkpoint is left in it: a relaunch starts from step 0"
    newest = full[-1]
    size = format_bytes(sum(newest.marker.get("files", {}).values()))
    return (f"The newest complete checkpoint, {newest.path} ({size}), is intact: a relaunch resumes from "
            f"step {newest.step}")


def low_space_warning(root: str) -> str | None:
    """A warning when the file system holding `root` has less free space than the newest full
    checkpoint there takes: the next save writes as much again before retention may delete an old
    one, so it would fail on a full disk. None when there is room, or nothing to compare with."""
    full = [folder for folder in folders.complete_checkpoints(root, warn=False) if not folder.model_only]
    if not full:
        return None
    newest = full[-1]
    needed = sum(newest.marker.get("files", {}).values())
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return None
    if free >= needed:
        return None
    return (f"checkpoint folder {root}: {format_bytes(free)} free, less than the {format_bytes(needed)} of its newest "
            f"checkpoint {os.path.basename(newest.path)}: the next save will fail on a full disk unless space is "
            f"freed (older step folders, other files) or job.dump_folder moves to a larger file system")


def save_model_only(state: dict, root: str, step: int, action: str) -> str:
    """Write `{"model": state}` as the complete model-only checkpoint `root/step-<step>` from this one
    process (seed checkpoints, Hugging Face imports); a failed write leaves no `.tmp` behind."""
    folders.ensure_writable(root)
    tmp_path, final_path = folders.tmp_folder(root, step), folders.step_folder(root, step)
    try:
        dcp.save({"model": state}, storage_writer=CheckpointWriter(tmp_path), no_dist=True)
        folders.commit(tmp_path, final_path, step=step, world_size=1, model_only=True)
    except (CheckpointException, OSError) as error:
        raise_save_failure(error, tmp_path, action, lambda: "")
    return final_path
