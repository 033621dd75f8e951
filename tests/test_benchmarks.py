"""The benchmark scripts run where CI runs: throughput on the debug model prints its table and
JSON; the GPU-only kernel benchmarks exit cleanly without CUDA."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO_ROOT


def run_script(*args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)


def test_throughput_benchmark_trains_the_debug_model_and_reports(tmp_path):
    out = tmp_path / "throughput.json"
    result = run_script("benchmarks/throughput.py", "--config", "train_configs/debug_model.toml", "--steps", "4",
                        "--warmup", "2", "--json", str(out), "--training.seq_len", "32",
                        "--lr_scheduler.warmup_steps", "1", "--validation.enable", "false",
                        "--job.dump_folder", str(tmp_path / "run"), "--metrics.enable_tensorboard", "false")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| torchtitan_like | cpu |" in result.stdout
    record = json.loads(out.read_text())
    assert record["timed_steps"] == 2 and record["tokens_per_second"] > 0 and record["mfu_pct"] is None
    assert record["last_loss"] < record["first_loss"]


@pytest.mark.parametrize("script", ["benchmarks/bench_rmsnorm.py", "benchmarks/bench_float8.py"])
def test_gpu_benchmarks_exit_cleanly_without_cuda(script):
    result = run_script(script, "--quick", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CUDA" in result.stdout + result.stderr
