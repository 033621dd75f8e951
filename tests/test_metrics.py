"""Metrics: peak-FLOPs lookup, MFU arithmetic, the log line and CPU's n/a."""

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
