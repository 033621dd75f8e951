"""Checkpoint folders on disk: naming, atomic commit, discovery of complete checkpoints, retention.

Layout under the checkpoint root (`<job.dump_folder>/<checkpoint.folder>`):

    step-100/              a complete checkpoint: DCP files plus the completion marker
        .metadata          DCP's index of every saved tensor
        __0_0.distcp ...   one data file per writing rank
        .complete          JSON marker: step, world size, time, model_only, files and their sizes
    step-200.tmp/          a save in progress (or a crashed one): never loaded
    export/step-200/       the final model-only save (`last_save_model_only`): a separate root, so
                           it never replaces or hides the full checkpoint of its step

A save writes into `step-N.tmp`; once every rank has finished writing, rank 0 writes `.complete`
(listing each file with its size) and renames the folder to `step-N`. A rename within one file system
is atomic, so a reader sees either no `step-N` or a complete one. Loading still re-checks the marker
and the sizes, which catches folders copied half-way or damaged later.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass

from torchtitan_like.errors import ConfigError, DataError
from torchtitan_like.filesystem import storage_error

COMPLETE_MARKER = ".complete"
TMP_SUFFIX = ".tmp"
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_TMP_FOLDER = re.compile(r"^step-(\d+)\.tmp$")
_REPLACED_FOLDER = re.compile(r"^step-(\d+)\.replaced\.tmp$")
EXPORT_FOLDER = "export"


@dataclass(frozen=True)
class CheckpointFolder:
    step: int
    path: str
    marker: dict

    @property
    def model_only(self) -> bool:
        return bool(self.marker.get("model_only", False))


def step_folder(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step}")


def tmp_folder(root: str, step: int) -> str:
    return step_folder(root, step) + TMP_SUFFIX


def export_root(root: str) -> str:
    """Where model-only exports of a run go: not a step folder of `root`, so resuming never sees them."""
    return os.path.join(root, EXPORT_FOLDER)


def ensure_writable(root: str) -> None:
    """Create `root` and a probe file in it, so an unwritable folder fails before training starts."""
    try:
        os.makedirs(root, exist_ok=True)
        # A name no other rank can hold (mkstemp creates it exclusively): ranks on other nodes share
        # the folder and may have the same pid (a container per node), and a shared name let one
        # rank delete another's probe, which then failed as "not writable".
        handle, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
        with os.fdopen(handle, "w") as probe_file:
            probe_file.write("ok")
        os.remove(probe)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):  # writable, but full: say how full
            raise storage_error(f"writing to checkpoint folder {root!r}", root, error,
                                "Free space, or set job.dump_folder / checkpoint.folder to another file system"
                                ) from error
        raise ConfigError(f"checkpoint folder {root!r} is not writable ({error.strerror or error}); set "
                          f"job.dump_folder / checkpoint.folder to a writable location") from error


def _fsync_folder(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp_path: str, final_path: str, step: int, world_size: int, model_only: bool) -> None:
    """Rank 0, after all ranks finished writing: write the marker, then rename tmp -> final. An OSError
    (a full disk while writing the marker) leaves `final_path` as it was; the caller removes tmp."""
    files = {}
    for name in sorted(os.listdir(tmp_path)):
        full = os.path.join(tmp_path, name)
        if os.path.isfile(full) and name != COMPLETE_MARKER:
            files[name] = os.path.getsize(full)
    marker = {"step": step, "world_size": world_size, "time": time.time(), "model_only": model_only, "files": files}
    marker_path = os.path.join(tmp_path, COMPLETE_MARKER)
    with open(marker_path, "w") as marker_file:
        json.dump(marker, marker_file, indent=1)
        marker_file.flush()
        os.fsync(marker_file.fileno())
    _fsync_folder(tmp_path)
    if os.path.exists(final_path):
        # Saving a step again (e.g. a run resumed from a checkpoint after it): move the old one
        # aside first so the new one still appears with a single rename.
        replaced = final_path + ".replaced" + TMP_SUFFIX
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final_path, replaced)
        try:
            os.rename(tmp_path, final_path)
        except OSError:
            os.rename(replaced, final_path)  # the old copy back: the step stays loadable
            raise
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.rename(tmp_path, final_path)
    _fsync_folder(os.path.dirname(final_path))


def check_complete(path: str) -> dict:
    """The marker of a complete checkpoint folder; DataError saying what is wrong otherwise."""
    from torchtitan_like.checkpoint.safe_storage import read_metadata

    marker_path = os.path.join(path, COMPLETE_MARKER)
    if not os.path.isfile(marker_path):
        raise DataError(f"{path}: no {COMPLETE_MARKER} marker (the save did not finish)")
    try:
        with open(marker_path) as marker_file:
            marker = json.load(marker_file)
        files = dict(marker["files"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path}: unreadable {COMPLETE_MARKER} marker ({error})") from error
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            raise DataError(f"{path}: file {name} listed in the marker is missing")
        if os.path.getsize(full) != size:
            raise DataError(f"{path}: file {name} has {os.path.getsize(full)} bytes, the marker says {size}")
    read_metadata(path)
    return marker


def step_folders(root: str) -> list[tuple[int, str]]:
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), os.path.join(root, name)))
    return sorted(found)


def complete_checkpoints(root: str, warn: bool = True) -> list[CheckpointFolder]:
    """Complete checkpoints under `root`, oldest first; incomplete or damaged ones are skipped with a
    warning that names them. Save-in-progress folders (`step-N.tmp`) are never considered."""
    complete = []
    for step, path in step_folders(root):
        try:
            complete.append(CheckpointFolder(step, path, check_complete(path)))
        except DataError as error:
            if warn:
                warnings.warn(f"skipping incomplete or corrupt checkpoint {error}", stacklevel=2)
    return complete


def resolve_checkpoint(path: str) -> CheckpointFolder:
    """A checkpoint given by the user: a step folder itself, or a root holding step folders (newest)."""
    if not os.path.isdir(path):
        raise DataError(f"checkpoint path {path!r} does not exist or is not a folder")
    if os.path.isfile(os.path.join(path, COMPLETE_MARKER)) or os.path.isfile(os.path.join(path, ".metadata")):
        marker = check_complete(path)
        match = _STEP_FOLDER.match(os.path.basename(os.path.normpath(path)))
        return CheckpointFolder(int(marker.get("step", match.group(1) if match else 0)), path, marker)
    found = complete_checkpoints(path)
    if not found:
        raise DataError(f"{path!r} holds no complete checkpoint (expected step-N folders with a "
                        f"{COMPLETE_MARKER} marker, or a step folder itself)")
    return found[-1]


@dataclass(frozen=True)
class LoadChoice:
    """The checkpoint a run loads at start, and whether it restores the model alone."""
    folder: CheckpointFolder
    model_only: bool


def choose_checkpoint(root: str, checkpoint_config, step: int = -1, warn: bool = True) -> LoadChoice | None:
    """What a run with checkpoint root `root` loads, or None when it starts fresh: checkpoint `step` (or
    `checkpoint.load_step`) when set; else the newest complete full checkpoint; else the newest
    model-only one (a seed checkpoint), which initializes the model only; else, for a run with no
    checkpoint of its own, `checkpoint.initial_load_path` (the model alone with `initial_load_model_only`).
    `CheckpointManager.load` loads it; the start-up checks (startup_fit.py) check it fits beforehand."""
    requested = step if step >= 0 else checkpoint_config.load_step
    found = complete_checkpoints(root, warn=warn)
    full = [folder for folder in found if not folder.model_only]
    if requested >= 0:
        matches = [folder for folder in found if folder.step == requested]
        if not matches:
            available = ", ".join(str(folder.step) for folder in found) or "none"
            raise ConfigError(f"checkpoint.load_step = {requested}: no complete checkpoint step-{requested} "
                              f"in {root} (complete steps: {available})")
        folder = matches[0]
    elif full:
        # Only a full checkpoint resumes a run. A model-only step folder in the run's own root
        # (written as the final save by older versions) must not hide it, or the run would
        # start over from step 0.
        folder = full[-1]
        for newer in (other for other in found if other.model_only and other.step > folder.step):
            if warn:
                warnings.warn(f"{newer.path} holds model weights only and cannot resume the run: resuming "
                              f"from the full checkpoint {folder.path}", stacklevel=3)
    elif found:  # only model-only ones, e.g. a seed checkpoint: they initialize the model
        folder = found[-1]
    elif checkpoint_config.initial_load_path:
        folder = resolve_checkpoint(checkpoint_config.initial_load_path)
        return LoadChoice(folder, checkpoint_config.initial_load_model_only or folder.model_only)
    else:
        return None
    if folder.model_only and folder.step > 0 and warn:
        warnings.warn(f"{folder.path} holds model weights only: training starts at step 0 from its "
                      f"weights; optimizer, scheduler and data position start fresh", stacklevel=3)
    return LoadChoice(folder, folder.model_only)


def _recover_interrupted_replace(root: str) -> None:
    """A crash between the two renames of `commit` replacing a step leaves no `step-N`, only the old
    copy (`step-N.replaced.tmp`) and the new one (`step-N.tmp`, marker written): put the new one in
    place if it is complete, else the old one, instead of deleting both with the stale folders."""
    for name in os.listdir(root):
        match = _REPLACED_FOLDER.match(name)
        if not match or os.path.exists(step_folder(root, int(match.group(1)))):
            continue
        step = int(match.group(1))
        for candidate in (tmp_folder(root, step), os.path.join(root, name)):
            try:
                check_complete(candidate)
            except DataError:
                continue
            os.rename(candidate, step_folder(root, step))
            warnings.warn(f"restored {step_folder(root, step)} from {os.path.basename(candidate)}, left by a save "
                          f"that replaced it and was cut off", stacklevel=3)
            break


def remove_stale_tmp(root: str) -> list[str]:
    """Rank 0 at start-up, before any save of this run: delete `step-N.tmp` folders of crashed saves
    (after restoring a step whose replacement was cut off between its two renames)."""
    removed = []
    if os.path.isdir(root):
        _recover_interrupted_replace(root)
        for name in os.listdir(root):
            if _TMP_FOLDER.match(name) or name.endswith(".replaced" + TMP_SUFFIX):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
                removed.append(name)
    return removed


def apply_retention(root: str, keep_latest_k: int, keep_step: int | None = None) -> list[str]:
    """Delete complete checkpoints older than the newest `keep_latest_k` full ones; 0 keeps all.

    Only complete folders are counted and deleted: an incomplete one may be a save in progress or
    evidence of a crash worth inspecting, and the newest complete checkpoint is always kept. Only
    full checkpoints count towards k (a model-only step folder cannot resume the run, so it must not
    push a full one out), and `keep_step`, the step just saved, is never deleted: a run resumed
    from an older step (`load_step`) saves below checkpoints it left behind.
    """
    if keep_latest_k <= 0:
        return []
    complete = complete_checkpoints(root, warn=False)
    full = [folder for folder in complete if not folder.model_only]
    if len(full) <= keep_latest_k:
        return []
    oldest_kept = full[-keep_latest_k].step
    doomed = [folder for folder in complete if folder.step < oldest_kept and folder.step != keep_step]
    for folder in doomed:
        shutil.rmtree(folder.path, ignore_errors=True)
    return [folder.path for folder in doomed]
