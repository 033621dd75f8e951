"""Metrics: peak-FLOPs lookup, MFU arithmetic, the log line and CPU's n/a, TensorBoard on a full disk."""

import errno
import os
import time

import pytest
import torch

from torchtitan_like.config.job_config import Metrics
from torchtitan_like.metrics import MetricsLogger, StepMetrics, format_line, peak_flops_for


@pytest.mark.parametrize("name,peak", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                       ("NVIDIA H100 PCIe", 756e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                       ("NVIDIA B200", 2250e12), ("Some Other GPU", None)])
def test_peak_flops_table(name, peak):
    assert peak_flops_for(name) == peak


def test_mfu_uses_override_and_flops_per_token(tmp_path):
    config = Metrics(enable_tensorboard=False, peak_flops=1e12)
    metrics = MetricsLogger(config, str(tmp_path), torch.device("cpu"), flops_per_token=1000, total_steps=10, rank=0)
    metrics.window_start -= 1.0  # pretend one second passed
    metrics.record_step(tokens=500_000, data_seconds=0.25)
    result = metrics.log(1, loss=2.0, grad_norm=1.0, lr=1e-3)
    # 500k tokens in ~1 s x 1000 FLOP/token = ~5e8 FLOP/s of 1e12 peak = ~0.05 %
    assert result.mfu == pytest.approx(100 * result.tokens_per_second * 1000 / 1e12)
    assert 0.03 < result.mfu < 0.06
    assert 20 < result.data_time_share < 26


def test_cpu_reports_mfu_as_not_available(tmp_path):
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), torch.device("cpu"), 1000, 10, 0)
    metrics.record_step(tokens=10, data_seconds=0.0)
    assert metrics.log(1, 2.0, 1.0, 1e-3).mfu is None
    line = format_line(StepMetrics(3, 2.5, 0.7, 1e-4, 1234.0, None, None, None, 1.0, 65.0), 10)
    assert "mfu n/a" in line and "memory n/a" in line and "step     3/10" in line and "eta 1m05s" in line


def test_eta_after_a_resume_counts_only_the_steps_this_process_ran(tmp_path):
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), torch.device("cpu"), 1000, 1000, 0)
    metrics.record_step(tokens=10, data_seconds=0.0)  # step 891, the first after resuming at step 890
    metrics.first_step_end -= 1.8  # then 9 more steps in 1.8 s
    for _ in range(9):
        metrics.record_step(tokens=10, data_seconds=0.0)
    result = metrics.log(900, 2.0, 1.0, 1e-3)
    assert result.eta_seconds == pytest.approx(100 * 0.2, rel=0.05)  # 100 steps left at 0.2 s


def test_eta_leaves_out_the_first_step_which_carries_compilation(tmp_path):
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), torch.device("cpu"), 1000, 1000, 0)
    metrics.start_time -= 61.8  # the first step took 60 s (compilation), the next 9 steps 0.2 s each
    metrics.record_step(tokens=10, data_seconds=0.0)
    metrics.first_step_end -= 1.8
    for _ in range(9):
        metrics.record_step(tokens=10, data_seconds=0.0)
    result = metrics.log(10, 2.0, 1.0, 1e-3)
    assert result.eta_seconds == pytest.approx(990 * 0.2, rel=0.05)  # not 990 x 6.18 s


def test_first_logged_step_estimates_the_eta_from_that_step(tmp_path):
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), torch.device("cpu"), 1000, 11, 0)
    metrics.start_time -= 5.0
    metrics.record_step(tokens=10, data_seconds=0.0)
    assert metrics.log(1, 2.0, 1.0, 1e-3).eta_seconds == pytest.approx(10 * 5.0, rel=0.05)


def test_validation_time_is_left_out_of_the_training_window(tmp_path):
    metrics = MetricsLogger(Metrics(enable_tensorboard=False), str(tmp_path), torch.device("cpu"), 1000, 100, 0)
    window_start, start_time = metrics.window_start, metrics.start_time
    before = time.perf_counter()
    with metrics.untimed():
        time.sleep(0.01)  # stands for a validation pass
    after = time.perf_counter()
    assert 0.01 <= metrics.window_start - window_start <= after - before
    assert metrics.start_time == start_time  # the ETA still counts it: validation recurs


def test_resumed_run_replaces_the_tensorboard_steps_logged_after_its_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = Metrics(enable_tensorboard=True, save_tb_folder="tb")
    interrupted = MetricsLogger(config, str(tmp_path), torch.device("cpu"), 1000, 8, 0)
    for step in range(1, 7):  # logged steps 1-6, its last checkpoint at step 4
        interrupted.record_step(tokens=10, data_seconds=0.0)
        interrupted.log(step, loss=10.0 + step, grad_norm=1.0, lr=1e-3)
    interrupted.close()
    (first_file,) = os.listdir(tmp_path / "tb")  # named to sort first, as an earlier run's file does
    os.rename(tmp_path / "tb" / first_file, tmp_path / "tb" / "events.out.tfevents.1.interrupted")
    resumed = MetricsLogger(config, str(tmp_path), torch.device("cpu"), 1000, 8, 0)
    for step in range(5, 9):  # the same job resumed from step 4
        resumed.record_step(tokens=10, data_seconds=0.0)
        resumed.log(step, loss=20.0 + step, grad_norm=1.0, lr=1e-3)
        resumed.log_validation(step, 3.0)
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tb"))
    accumulator.Reload()
    losses = [(event.step, event.value) for event in accumulator.Scalars("loss_metrics/global_avg_loss")]
    assert losses == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 25.0), (6, 26.0), (7, 27.0), (8, 28.0)]
    assert [event.step for event in accumulator.Scalars("validation_metrics/loss")] == [5, 6, 7, 8]


@pytest.mark.parametrize("tp,pp,dp_shard,expected", [(1, 1, 2, 1024), (2, 1, 1, 512), (2, 2, 2, 256)])
def test_tokens_per_device_split_a_batch_over_its_tensor_and_pipeline_ranks(tp, pp, dp_shard, expected):
    from types import SimpleNamespace

    from torchtitan_like.config.job_config import Training
    from torchtitan_like.parallelisms.parallel_dims import ParallelDims
    from torchtitan_like.trainer import Trainer

    trainer = SimpleNamespace(config=SimpleNamespace(training=Training(local_batch_size=2, seq_len=256)),
                              grad_accum_steps=2, parallel_dims=ParallelDims(dp_replicate=1, dp_shard=dp_shard,
                                                                             tp=tp, pp=pp, world_size=tp * pp * dp_shard))
    assert Trainer.tokens_per_device_step.fget(trainer) == expected


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # TensorBoard's writer thread
def test_a_tensorboard_write_that_fails_warns_once_and_training_goes_on(tmp_path, monkeypatch):
    """The event file's disk fills up mid-run: one warning naming it, TensorBoard off, every later
    log line still computed. Before: the OSError of TensorBoard's writer thread stopped training."""
    from tensorboard.compat.tensorflow_stub.io import gfile

    from torchtitan_like import metrics as metrics_module

    logged = []
    monkeypatch.setattr(metrics_module.logger, "warning", logged.append)
    metrics = MetricsLogger(Metrics(enable_tensorboard=True), str(tmp_path), torch.device("cpu"), 1000, 10, 0)
    metrics.record_step(tokens=10, data_seconds=0.0)
    metrics.log(1, 2.0, 1.0, 1e-3)

    def no_space(self, filename, file_content, mode):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", no_space)
    for step in (2, 3, 4):
        metrics.record_step(tokens=10, data_seconds=0.0)
        assert metrics.log(step, 2.0, 1.0, 1e-3).loss == 2.0
    metrics.log_validation(4, 1.5)
    metrics.close()
    assert metrics.writer is None
    [warning] = logged
    assert warning.startswith(f"TensorBoard: cannot write {tmp_path / 'tb'}")
    assert "No space left on device (ENOSPC); " in warning and " free of " in warning
    assert "TensorBoard logging is off for the rest of this run, training goes on" in warning
