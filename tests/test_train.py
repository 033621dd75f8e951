"""End to end: the debug model trains on the built-in corpus from the CLI, its training and
validation losses fall, TensorBoard events hold the loss, and the README's train command runs;
`--check-config` checks a config in one process and starts nothing."""

import glob
import math
import os
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO_ROOT, run_cli, tiny_overrides

STEPS = 60


def scalar_series(event_folder: str, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(event_folder)
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """{name: (dump folder, future of the CompletedProcess)} of every CLI run of this module, started
    together two at a time: each is one process (OMP_NUM_THREADS=1) and CI has two cores, so the short
    runs finish beside the long debug run. Each test checks its own run."""
    runs = {  # name: (arguments given the dump folder, timeout)
        "debug_run": (lambda dump: [
            "--config", "train_configs/debug_model.toml", "--job.dump_folder", dump, "--training.steps", str(STEPS),
            "--training.seq_len", "128", "--lr_scheduler.warmup_steps", "5", "--metrics.log_freq", "5",
            "--validation.freq", "30", "--validation.steps", "4", "--metrics.disable_color_printing"], 600),
        # TorchTitan 0.2 turns Float8 on through model.converters alone, with no float8.enable key.
        "converters": (lambda dump: tiny_overrides(dump, steps=1) + [
            "--model.converters", "quantize.linear.float8", "--float8.emulate", "true",
            "--job.description", "converter check 42", "--model.print_after_conversion"], 300),
        "readme": (lambda dump: readme_train_command() + [
            "--training.steps", "3", "--lr_scheduler.warmup_steps", "1", "--job.dump_folder", dump,
            "--validation.enable", "false"], 300),
    }
    with ThreadPoolExecutor(2) as pool:
        started = {}
        for name, (arguments, timeout) in runs.items():
            dump = str(tmp_path_factory.mktemp(name))
            # arguments built in the worker: a lost README command fails its own test only
            started[name] = (dump, pool.submit(lambda arguments=arguments, dump=dump, timeout=timeout:
                                               run_cli(arguments(dump), timeout=timeout)))
        yield started


@pytest.fixture(scope="module")
def debug_run(cli_runs):
    dump, future = cli_runs["debug_run"]
    result = future.result()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dump, result


def test_loss_falls_well_below_its_start(debug_run):
    dump, _ = debug_run
    losses = scalar_series(os.path.join(dump, "tb"), "loss_metrics/global_avg_loss")
    first, last = losses[1], losses[STEPS]
    # A byte-level model starts near ln(258) = 5.55; 60 steps of the debug model reach well under 3.2.
    assert 5.0 < first < 6.6  # near ln(258) = 5.55, plus the spread of the initial logits
    assert last < 3.2, losses
    assert last < first - 2.0


def test_validation_loss_falls_and_is_logged_with_perplexity(debug_run):
    dump, result = debug_run
    val = scalar_series(os.path.join(dump, "tb"), "validation_metrics/loss")
    perplexity = scalar_series(os.path.join(dump, "tb"), "validation_metrics/perplexity")
    assert sorted(val) == [30, 60]
    assert val[60] < val[30] < math.log(258)
    assert perplexity[60] == pytest.approx(math.exp(val[60]), rel=1e-4)
    assert "validation step 60" in result.stdout


def test_log_line_has_every_metric_and_the_resolved_config_is_saved(debug_run):
    dump, result = debug_run
    line = next(l for l in result.stdout.splitlines() if f"step    {STEPS}/{STEPS}" in l)
    for field in ("loss", "grad_norm", "lr", "tps/device", "mfu n/a", "memory n/a", "data", "eta"):
        assert field in line, line
    with open(os.path.join(dump, "config.toml")) as handle:
        assert f"steps = {STEPS}" in handle.read()
    assert glob.glob(os.path.join(dump, "tb", "events.out.tfevents.*"))


def test_logged_lr_is_the_lr_each_step_used(debug_run):
    from torchtitan_like.config import load_config
    from torchtitan_like.optim import lr_multiplier

    dump, _ = debug_run
    config, _ = load_config(["--config", os.path.join(dump, "config.toml")])
    schedule = config.lr_scheduler
    logged = scalar_series(os.path.join(dump, "tb"), "lr")
    assert sorted(logged) == [1] + list(range(5, STEPS + 1, 5))
    for step, lr in logged.items():
        expected = config.optimizer.lr * lr_multiplier(
            step, total_steps=STEPS, warmup_steps=schedule.warmup_steps, decay_type=schedule.decay_type,
            decay_ratio=schedule.decay_ratio, min_lr_factor=schedule.min_lr_factor)
        assert lr == pytest.approx(expected, rel=1e-6), step


def test_converters_description_and_print_after_conversion_take_effect(cli_runs):
    dump, future = cli_runs["converters"]
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "job: converter check 42" in output
    assert re.search(r"float8: swapped [1-9]\d* nn.Linear", output), output[-3000:]
    assert "(wq): Float8Linear(" in output  # the printed model, after the swap
    with open(os.path.join(dump, "config.toml")) as handle:
        assert re.search(r"\[float8\][^[]*enable = true", handle.read())


def readme_train_command() -> list[str]:
    with open(os.path.join(REPO_ROOT, "README.md")) as handle:
        text = handle.read()
    match = re.search(r"\.venv/bin/python -m torchtitan_like\.train ([^\n`]*)", text)
    assert match, "README lost its train command"
    return shlex.split(match.group(1))


def test_readme_train_command_runs(cli_runs):
    result = cli_runs["readme"][1].result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step     3/3" in result.stdout


def test_check_config_passes_a_good_config_for_world_size_processes_and_creates_only_the_dump_folder(tmp_path):
    # WORLD_SIZE=2 and no rendezvous address: creating a process group would fail at once
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", PYTHONUNBUFFERED="1")
    dump = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "torchtitan_like.train", "--check-config", *tiny_overrides(str(dump)),
                             "--parallelism.data_parallel_shard_degree", "2"],
                            capture_output=True, text=True, timeout=120, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config OK for 2 processes: llama3 debugmodel, mesh dp_shard 2" in result.stdout
    assert os.listdir(tmp_path) == ["run"] and os.listdir(dump) == []
