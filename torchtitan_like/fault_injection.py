"""Deterministic fault injection for fault-tolerance tests.

`TORCHTITAN_LIKE_FAULT="RANK:STEP:PHASE"` makes rank RANK kill itself with SIGKILL at step STEP,
either mid-training (`train`: after the step's optimizer update, before its logging, validation
and checkpoint save) or mid-save
(`save`: after this rank wrote its checkpoint files, before the commit); PHASE `preempt` sends it
SIGTERM at the `train` point instead, as a scheduler preempting the job would, and PHASE `enospc`
makes rank RANK's storage write of the full checkpoint of step STEP (synchronous or async) raise
`OSError(ENOSPC)` after writing its files, as a disk filling up mid-save does. It fires only in the
first attempt of a torchrun job (TORCHELASTIC_RESTART_COUNT = 0), so the restarted group runs clean.
A comma-separated list gives one fault per attempt: the i-th fires in attempt i (restart count i),
so one torchrun job with `--max-restarts N` can lose a rank N times in different places.
"""

from __future__ import annotations

import errno
import os
import signal


def _spec() -> tuple[int, int, str] | None:
    text = os.environ.get("TORCHTITAN_LIKE_FAULT", "")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = [fault for fault in text.split(",") if fault]
    if attempt >= len(faults):
        return None
    rank, step, phase = faults[attempt].split(":")
    return int(rank), int(step), phase


def maybe_inject_fault(rank: int, step: int, phase: str) -> None:
    spec = _spec()
    if spec is None or spec[:2] != (rank, step):
        return
    if spec[2] == phase:
        os.kill(os.getpid(), signal.SIGKILL)
    elif spec[2] == "preempt" and phase == "train":
        os.kill(os.getpid(), signal.SIGTERM)


def maybe_inject_write_error(rank: int, step: int, path: str) -> None:
    """Raise ENOSPC for the `enospc` fault of this rank and step (checkpoint/writing.py calls it
    inside the storage write, so DCP reports it as it would a real full disk)."""
    if _spec() == (rank, step, "enospc"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
