"""Profiler traces and CUDA memory snapshots at configured steps (config section `profiling`).

How the training loop uses it (every rank):

    with maybe_enable_profiling(config.profiling, config.job.dump_folder, global_step=step, rank=rank) as profiler, \\
         maybe_enable_memory_snapshot(config.profiling, config.job.dump_folder, global_step=step, rank=rank) as snapshot:
        for step in range(step + 1, steps + 1):
            ...train one step...
            profiler.step()
            snapshot.step()

`global_step` is the step the run starts after (the resumed step, 0 for a fresh run), so the captured
steps stay multiples of `profile_freq` across restarts. Both context managers always yield an object
with `.step()`; when disabled it does nothing, so the loop needs no `if`.

Outputs, under `<job.dump_folder>`:
- `<save_traces_folder>/iteration_<step>/rank<R>_trace.json`: a Chrome trace of training step
  `step` (every multiple of `profile_freq`), for Perfetto (ui.perfetto.dev), chrome://tracing or
  TensorBoard's profiler plugin.
- `<save_memory_snapshot_folder>/iteration_<step>/rank<R>_memory_snapshot.pickle`: the CUDA
  allocator's history up to that step, and `iteration_<step>_oom/...` when the step ran out of memory;
  drag it onto https://pytorch.org/memory_viz. CUDA only: elsewhere a single info line says so.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from torchtitan_like.logging import logger

# Steps traced before the captured one: the first warm-up steps of the profiler carry its own
# start-up overhead, so they are discarded (TorchTitan uses the same 3).
PROFILER_WARMUP_STEPS = 3
# Allocation events kept by the memory recorder; about 100k covers several steps of a large model.
MEMORY_HISTORY_MAX_ENTRIES = 100_000


class _NoOp:
    """Stand-in when a feature is disabled: the loop calls `.step()` unconditionally."""

    def step(self) -> None:
        pass


def profiler_schedule(profile_freq: int) -> tuple[int, int, int]:
    """(wait, warmup, active) of a cycle of `profile_freq` steps whose last step is traced, so that
    traced steps are the multiples of profile_freq (counting from 1)."""
    active = 1
    warmup = min(PROFILER_WARMUP_STEPS, profile_freq - active)
    return profile_freq - warmup - active, warmup, active


@contextlib.contextmanager
def maybe_enable_profiling(profiling_config, dump_folder: str, global_step: int = 0, rank: int = 0):
    """Yield a torch profiler tracing every `profile_freq`-th step, or a no-op (see module docstring)."""
    if not profiling_config.enable_profiling:
        yield _NoOp()
        return
    trace_root = os.path.join(dump_folder, profiling_config.save_traces_folder)
    wait, warmup, active = profiler_schedule(profiling_config.profile_freq)
    leaving = False  # set as the loop leaves the block: a trace still open then holds no whole step

    def save_trace(profiler: torch.profiler.profile) -> None:
        if leaving:
            # The profiler saves an open trace on exit. It was opened by the last `.step()` for the
            # step after it, which never ran (the run ended, or raised mid-step): saved, it would be
            # named after the last finished step and, with profile_freq = 1, overwrite that step's trace.
            return
        # step_num counts completed steps; the traced one is the step just finished.
        step = profiler.step_num + global_step
        folder = os.path.join(trace_root, f"iteration_{step}")
        os.makedirs(folder, exist_ok=True)
        started = time.monotonic()
        profiler.export_chrome_trace(os.path.join(folder, f"rank{rank}_trace.json"))
        logger.info(f"profiler trace of step {step} saved to {folder} in {time.monotonic() - started:.1f} s")

    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    logger.info(f"profiling every {profiling_config.profile_freq} steps into {trace_root}")
    cycle = torch.profiler.schedule(wait=wait, warmup=warmup, active=active)
    # Resuming at global_step: the profiler counts its steps from 0 and reads its first action from
    # schedule(0) as it starts, so the schedule is shifted by global_step (setting step_num after the
    # start would leave that first action stale and could skip a due trace).
    with torch.profiler.profile(activities=activities, schedule=lambda step: cycle(step + global_step),
                                on_trace_ready=save_trace, record_shapes=True) as profiler:
        try:
            yield profiler
        finally:
            leaving = True


class MemorySnapshotRecorder:
    """Dumps the CUDA allocator history every `profile_freq` steps and on out-of-memory."""

    def __init__(self, snapshot_root: str, profile_freq: int, global_step: int, rank: int):
        self.snapshot_root, self.profile_freq, self.rank = snapshot_root, profile_freq, rank
        self.step_num = global_step

    def step(self) -> None:
        """Call once after each training step."""
        self.step_num += 1
        if self.step_num % self.profile_freq == 0:
            self.dump(f"iteration_{self.step_num}")

    def dump(self, folder_name: str) -> str:
        folder = os.path.join(self.snapshot_root, folder_name)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{self.rank}_memory_snapshot.pickle")
        torch.cuda.memory._dump_snapshot(path)
        logger.info(f"CUDA memory snapshot saved to {path}")
        return path


@contextlib.contextmanager
def maybe_enable_memory_snapshot(profiling_config, dump_folder: str, global_step: int = 0, rank: int = 0):
    """Yield a `MemorySnapshotRecorder` recording CUDA allocations, or a no-op when disabled or
    without CUDA. An out-of-memory error inside the block dumps a final snapshot and is re-raised."""
    if not profiling_config.enable_memory_snapshot:
        yield _NoOp()
        return
    if not torch.cuda.is_available():
        logger.info("profiling.enable_memory_snapshot: CUDA is not available, no memory snapshots are recorded")
        yield _NoOp()
        return
    snapshot_root = os.path.join(dump_folder, profiling_config.save_memory_snapshot_folder)
    torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_MAX_ENTRIES)
    recorder = MemorySnapshotRecorder(snapshot_root, profiling_config.profile_freq, global_step, rank)
    try:
        yield recorder
    except torch.OutOfMemoryError:
        # The step that failed is the one after the last completed step.
        recorder.dump(f"iteration_{recorder.step_num + 1}_oom")
        raise
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
