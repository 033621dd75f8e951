"""Profiler traces at multiples of profile_freq (also after a resume) and CUDA memory snapshots."""

from __future__ import annotations

import json
import os

import pytest
import torch

from torchtitan_like import profiling
from torchtitan_like.config.job_config import Profiling
from torchtitan_like.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling, profiler_schedule


def _train(steps: range, profiler, snapshot=None) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in steps:
        loss = model(torch.randn(8, 16)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if profiler is not None:
            profiler.step()
        if snapshot is not None:
            snapshot.step()


def _traced_steps(root: str) -> list[int]:
    return sorted(int(name.removeprefix("iteration_")) for name in os.listdir(root)) if os.path.isdir(root) else []


def test_traces_are_written_at_multiples_of_profile_freq_and_parse_as_json(tmp_path):
    config = Profiling(enable_profiling=True, profile_freq=3, save_traces_folder="traces")
    with maybe_enable_profiling(config, str(tmp_path), global_step=0, rank=2) as profiler:
        _train(range(1, 8), profiler)
    assert _traced_steps(tmp_path / "traces") == [3, 6]
    with open(tmp_path / "traces" / "iteration_6" / "rank2_trace.json") as trace_file:
        trace = json.load(trace_file)
    names = {event.get("name", "") for event in trace["traceEvents"]}
    assert any(name.startswith("aten::") for name in names)


@pytest.mark.parametrize("profile_freq,last_step", [(1, 3), (10, 9)])
def test_trace_opened_for_a_step_that_never_ran_is_not_saved(tmp_path, profile_freq, last_step):
    # The last step() opens the trace of the step after it; the run ends first. Saved on exit, it
    # would overwrite step 3's trace with an empty one (freq 1) or add an empty "iteration_9" (freq 10).
    config = Profiling(enable_profiling=True, profile_freq=profile_freq, save_traces_folder="traces")
    with maybe_enable_profiling(config, str(tmp_path), global_step=0, rank=0) as profiler:
        _train(range(1, last_step + 1), profiler)
    traced = _traced_steps(tmp_path / "traces")
    assert traced == list(range(profile_freq, last_step + 1, profile_freq))
    for step in traced:
        with open(tmp_path / "traces" / f"iteration_{step}" / "rank0_trace.json") as trace_file:
            names = {event.get("name", "") for event in json.load(trace_file)["traceEvents"]}
        assert any(name.startswith("aten::") for name in names), step


@pytest.mark.parametrize("resumed_at", [5, 8, 9])
def test_resumed_run_keeps_tracing_multiples_of_profile_freq(tmp_path, resumed_at):
    # Resumed one step before a multiple (9 with freq 10) the first due trace is the very next step.
    config = Profiling(enable_profiling=True, profile_freq=10, save_traces_folder="traces")
    with maybe_enable_profiling(config, str(tmp_path), global_step=resumed_at, rank=0) as profiler:
        _train(range(resumed_at + 1, 31), profiler)  # up to step 30
    assert _traced_steps(tmp_path / "traces") == [10, 20, 30]


def test_schedule_fits_any_frequency():
    for freq in (1, 2, 4, 10, 100):
        wait, warmup, active = profiler_schedule(freq)
        assert wait >= 0 and warmup >= 0 and active == 1 and wait + warmup + active == freq


def test_disabled_profiling_and_snapshots_are_no_ops(tmp_path):
    config = Profiling()
    with maybe_enable_profiling(config, str(tmp_path)) as profiler, \
            maybe_enable_memory_snapshot(config, str(tmp_path)) as snapshot:
        _train(range(1, 3), profiler, snapshot)
    assert os.listdir(tmp_path) == []


def test_memory_snapshot_without_cuda_logs_once_and_does_nothing(tmp_path, monkeypatch):
    messages = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(profiling.logger, "info", messages.append)
    config = Profiling(enable_memory_snapshot=True, profile_freq=1)
    with maybe_enable_memory_snapshot(config, str(tmp_path)) as snapshot:
        _train(range(1, 4), None, snapshot)
    assert len(messages) == 1 and "CUDA is not available" in messages[0]
    assert os.listdir(tmp_path) == []


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    """CUDA's allocator-history functions replaced by recorders (no GPU needed)."""
    calls = {"record": []}

    def dump(path):
        with open(path, "wb") as snapshot_file:
            snapshot_file.write(b"snapshot")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda.memory, "_record_memory_history", lambda *a, **k: calls["record"].append(k))
    monkeypatch.setattr(torch.cuda.memory, "_dump_snapshot", dump)
    return calls


def test_memory_snapshots_at_configured_steps_and_on_oom(tmp_path, fake_cuda_memory):
    config = Profiling(enable_memory_snapshot=True, profile_freq=2, save_memory_snapshot_folder="snapshots")
    with pytest.raises(torch.OutOfMemoryError):
        with maybe_enable_memory_snapshot(config, str(tmp_path), global_step=0, rank=1) as snapshot:
            for _ in range(5):
                snapshot.step()
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    root = tmp_path / "snapshots"
    assert sorted(os.listdir(root)) == ["iteration_2", "iteration_4", "iteration_6_oom"]
    assert os.path.isfile(root / "iteration_6_oom" / "rank1_memory_snapshot.pickle")
    assert fake_cuda_memory["record"][-1] == {"enabled": None}  # recording stopped on exit
