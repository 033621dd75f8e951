"""Preemption: on SIGTERM or SIGUSR1 (Slurm's warning signal, `--signal=B:USR1@120`), finish the
current step, save a full checkpoint and exit with `PREEMPTED_EXIT_CODE`; a requeued job then
resumes from that checkpoint by itself.

A signal may reach ranks at slightly different moments, so the stop decision is all-reduced at
each step boundary: every rank saves and stops at the same step.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from torchtitan_like.logging import logger

# EX_TEMPFAIL from sysexits.h: "temporary failure, the user is invited to retry".
PREEMPTED_EXIT_CODE = 75
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised by the trainer after saving, once every rank agreed to stop; `saved` is False when
    checkpointing is off (a restart then trains from the start, and the message says so)."""

    def __init__(self, step: int, saved: bool = True):
        if saved:
            message = f"preempted: saved a checkpoint at step {step} and stopped"
        else:
            message = (f"preempted at step {step} and stopped; nothing was saved (checkpoint.enable = false), "
                       f"so a restart trains from step 0")
        super().__init__(message)
        self.step, self.saved = step, saved


class PreemptionWatcher:
    """Records preemption signals; `should_stop()` agrees across ranks."""

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            logger.warning(f"received {signal.Signals(signum).name}: saving at the end of this step, then exiting")
        self.received = signum

    def should_stop(self) -> bool:
        flag = torch.tensor(1.0 if self.received is not None else 0.0,
                            device=self.device if self.device.type == "cuda" else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
