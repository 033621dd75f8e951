"""The trainer never loses a run: exact resume after a kill, after a save that ran out of disk space,
preemption by SIGTERM, and ranks killed mid-training and mid-save under `torchrun --max-restarts`
(FSDP 2 x TP 2 on CPU gloo)."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.helpers import REPO_ROOT, launch, run_cli
from torchtitan_like.checkpoint import folders
from torchtitan_like.checkpoint.safe_storage import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchtitan_like.preemption import PREEMPTED_EXIT_CODE


def run_args(dump: str, steps: int, interval: int, batch: int = 2) -> list[str]:
    return ["--config", "train_configs/debug_model.toml", "--job.dump_folder", dump, "--training.steps", str(steps),
            "--training.seq_len", "32", "--training.local_batch_size", str(batch), "--lr_scheduler.warmup_steps", "1",
            "--validation.enable", "false", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
            "--checkpoint.enable", "--checkpoint.interval", str(interval), "--checkpoint.last_save_model_only", "false"]


def read_section(path: str, section: str) -> dict[str, torch.Tensor]:
    """The full tensors of one top-level state of a checkpoint, read on this process without pickles."""
    metadata = read_metadata(path)
    prefix = section + "."
    state = {key[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in metadata.state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    loaded = {section: state}
    dcp.load(loaded, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
    return loaded[section]


def final_losses_and_model(dump: str, step: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    path = os.path.join(dump, "checkpoint", f"step-{step}")
    folders.check_complete(path)
    return read_section(path, "train_state")["losses"].tolist(), read_section(path, "model")


def saved_rng(dump: str, step: int) -> dict[str, torch.Tensor]:
    return read_section(os.path.join(dump, "checkpoint", f"step-{step}"), "rng")


def assert_all_committed_checkpoints_load(dump: str) -> list[int]:
    complete = folders.complete_checkpoints(os.path.join(dump, "checkpoint"), warn=False)
    for checkpoint in complete:
        read_section(checkpoint.path, "model")  # raises when a file is missing or truncated
    return sorted(c.step for c in complete)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """straight_run() -> (losses, model, rng) of an uninterrupted run. It runs in the background while
    the test runs its killed one: each is a single process (OMP_NUM_THREADS=1) on CI's two cores."""
    dump = str(tmp_path_factory.mktemp("straight"))
    with ThreadPoolExecutor(1) as background:
        future = background.submit(run_cli, run_args(dump, steps=8, interval=4), timeout=300)

        def result():
            completed = future.result()
            assert completed.returncode == 0, completed.stderr[-3000:]
            return (*final_losses_and_model(dump, 8), saved_rng(dump, 8))

        yield result


def test_resume_after_a_kill_is_bitwise_identical_to_a_straight_run(tmp_path, straight_run):
    dump = str(tmp_path)
    killed = run_cli(run_args(dump, steps=8, interval=4), timeout=300, env={"TORCHTITAN_LIKE_FAULT": "0:6:train"})
    assert killed.returncode == -signal.SIGKILL
    assert assert_all_committed_checkpoints_load(dump) == [4]
    resumed = run_cli(run_args(dump, steps=8, interval=4), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout
    losses, model = final_losses_and_model(dump, 8)
    expected_losses, expected_model, expected_rng = straight_run()
    assert losses == expected_losses  # bit for bit: same data position, RNG, optimizer and schedule
    for name, value in expected_model.items():
        assert torch.equal(model[name], value), name
    # Nothing (e.g. iter(dataloader)) drew from the restored RNGs, torch's and Python's (seeded too).
    resumed_rng = saved_rng(dump, 8)
    for generator in ("rank_0.torch_cpu", "rank_0.python"):
        assert torch.equal(resumed_rng[generator], expected_rng[generator]), generator


def test_a_save_that_runs_out_of_disk_space_exits_2_and_the_relaunch_resumes_identically(tmp_path, straight_run):
    # TORCHTITAN_LIKE_FAULT=0:8:enospc: the write of step 8's checkpoint fails as on a full disk.
    # Before: a CheckpointException traceback ("RuntimeError: ... unexpected pos"), exit code 1, and
    # the partial step-8.tmp kept the space until the next start.
    dump = str(tmp_path)
    full = run_cli(run_args(dump, steps=8, interval=4), timeout=300, env={"TORCHTITAN_LIKE_FAULT": "0:8:enospc"})
    assert full.returncode == 2, full.stderr[-3000:]
    assert "Traceback" not in full.stderr
    [error] = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
    tmp = os.path.join(dump, "checkpoint", "step-8.tmp")
    assert error.startswith(f"error: saving checkpoint step 8 failed: {tmp}: No space left on device (ENOSPC); ")
    assert "The partial step-8.tmp was removed" in error and "a relaunch resumes from step 4" in error
    assert assert_all_committed_checkpoints_load(dump) == [4]
    assert sorted(os.listdir(os.path.join(dump, "checkpoint"))) == ["step-4"]
    resumed = run_cli(run_args(dump, steps=8, interval=4), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout
    losses, model = final_losses_and_model(dump, 8)
    expected_losses, expected_model, _ = straight_run()
    assert losses == expected_losses
    for name, value in expected_model.items():
        assert torch.equal(model[name], value), name


def test_a_finished_run_relaunched_trains_nothing_and_an_extended_one_resumes_from_its_last_step(tmp_path):
    dump = str(tmp_path)
    args = run_args(dump, steps=4, interval=2)[:-2]  # default last_save_model_only = true
    finished = run_cli(args, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(dump, "checkpoint"))) == ["export", "step-2", "step-4"]
    losses, _ = final_losses_and_model(dump, 4)
    relaunched = run_cli(args, timeout=300)  # e.g. a Slurm requeue or torchrun restart of a finished job
    assert relaunched.returncode == 0, relaunched.stderr[-3000:]
    assert "resumed from step 4" in relaunched.stdout and "nothing to train" in relaunched.stdout
    assert "step     1/4" not in relaunched.stdout
    extended = run_args(dump, steps=6, interval=2)[:-2] + ["--optimizer.lr", "1e-4"]
    resumed = run_cli(extended, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 4" in resumed.stdout
    assert "optimizer.lr changed on resume: 0.002 -> 0.0001" in resumed.stdout
    assert final_losses_and_model(dump, 6)[0][:4] == losses


def test_sigterm_saves_at_the_step_boundary_exits_75_and_resume_continues(tmp_path):
    with ThreadPoolExecutor(1) as background:  # the reference run, on the other core
        straight = str(tmp_path / "straight")
        straight_result = background.submit(run_cli, run_args(straight, steps=60, interval=1000), timeout=300)
        losses = preempt_and_resume(str(tmp_path / "preempted"))
        assert straight_result.result().returncode == 0
    assert losses == final_losses_and_model(straight, 60)[0]


def preempt_and_resume(dump: str) -> list[float]:
    """SIGTERM at step 2 of 60: exit 75 with one complete checkpoint; the relaunch resumes from it and
    finishes. Returns the losses of the 60 steps."""
    args = run_args(dump, steps=60, interval=1000)
    process = subprocess.Popen([sys.executable, "-m", "torchtitan_like.train", *args], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 240
        for line in process.stdout:
            if "step     2/60" in line:
                process.send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "training did not start in time"
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "preempted: saved a checkpoint at step" in stderr
    saved = assert_all_committed_checkpoints_load(dump)
    assert len(saved) == 1 and 2 <= saved[0] < 60
    resumed = run_cli(args, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {saved[0]}" in resumed.stdout
    return final_losses_and_model(dump, 60)[0]


def parallel_run_args(dump: str) -> list[str]:
    """FSDP 2 x TP 2 on 4 processes, 6 steps, a checkpoint every 2."""
    return run_args(dump, steps=6, interval=2, batch=2) + [
        "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"]


def torchrun(dump: str, fault: str = "", timeout: float = 420, max_restarts: int = 1) -> subprocess.CompletedProcess:
    """FSDP 2 x TP 2 on 4 CPU processes; `max_restarts` restarts allowed."""
    args = parallel_run_args(dump)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if fault:
        env["TORCHTITAN_LIKE_FAULT"] = fault
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "--max-restarts", str(max_restarts), "--monitor-interval", "0.5", "-m", "torchtitan_like.train",
               *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def straight_parallel_run(tmp_path_factory):
    """The uninterrupted run the restarted ones must match. It tests nothing of torchrun's, so its ranks
    are forked from one interpreter that imported the trainer once (tests/forking.py)."""
    dump = str(tmp_path_factory.mktemp("straight_fsdp2_tp2"))
    launch(["-m", "torchtitan_like.train", *parallel_run_args(dump)], 4, timeout=420, fork=True)
    return final_losses_and_model(dump, 6)


def test_a_rank_killed_mid_save_then_another_mid_training_restarts_the_group_which_finishes_identically(
        tmp_path, straight_parallel_run):
    # One torchrun job, two faults (one per attempt): rank 1 dies in attempt 0 after writing its
    # files of step 4 but before the commit, so attempt 1 resumes from step 2 and saves step 4 over
    # the leftovers; rank 1 dies again in attempt 1 after step 5's update, so attempt 2 resumes from
    # step 4 and finishes.
    dump = str(tmp_path)
    result = torchrun(dump, "1:4:save,1:5:train", timeout=480, max_restarts=2)
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "resumed from step 2" in output and "resumed from step 4" in output
    assert output.index("resumed from step 2") < output.index("resumed from step 4")
    assert assert_all_committed_checkpoints_load(dump) == [2, 4, 6]
    assert not [name for name in os.listdir(os.path.join(dump, "checkpoint")) if "tmp" in name]
    losses, model = final_losses_and_model(dump, 6)
    expected_losses, expected_model = straight_parallel_run
    assert losses == expected_losses
    for name, value in expected_model.items():
        assert torch.equal(model[name], value), name


def test_a_seed_checkpoint_starts_every_plan_from_the_same_weights(tmp_path):
    from tests.helpers import free_port
    from torchtitan_like.models.llama3 import Transformer, get_flavor

    def first_loss(dump, extra, nproc=1):
        args = run_args(str(tmp_path / dump), steps=1, interval=1000) + extra
        if nproc == 1:
            result = run_cli(args, timeout=300)
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                       "--master-port", str(free_port()), "-m", "torchtitan_like.train", *args]
            result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                                    env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        return final_losses_and_model(str(tmp_path / dump), 1)[0][0]

    # single-process runs go to the background, on the other core: `plain` needs no seed checkpoint,
    # `single` runs beside the 2-process `fsdp2`
    with ThreadPoolExecutor(2) as background:
        plain = background.submit(first_loss, "plain", ["--training.local_batch_size", "4"])
        seed_dump = str(tmp_path / "seed")
        created = run_cli(["--config", "train_configs/debug_model.toml", "--job.dump_folder", seed_dump,
                           "--checkpoint.enable", "--checkpoint.create_seed_checkpoint", "--training.seed", "7"])
        assert created.returncode == 0, created.stderr[-3000:]
        seed_path = os.path.join(seed_dump, "checkpoint", "step-0")
        from_seed = ["--checkpoint.initial_load_path", seed_path]
        single = background.submit(first_loss, "single", from_seed + ["--training.local_batch_size", "4"])
        args = get_flavor("debugmodel")
        args.vocab_size = 258
        expected = Transformer(args)
        expected.init_weights(7)
        seeded = read_section(seed_path, "model")
        for name, value in expected.state_dict().items():
            assert torch.equal(seeded[name], value), name
        fsdp = first_loss("fsdp2", from_seed + ["--parallelism.data_parallel_shard_degree", "2"], nproc=2)
        single, plain = single.result(), plain.result()
    assert single == pytest.approx(fsdp, rel=1e-5)  # same weights and global batch under both plans
    assert single != plain  # the seed checkpoint's weights, not the run's own seed-0 init


def test_preemption_reports_what_it_saved_and_a_config_that_does_not_fit_keeps_the_runs_config(tmp_path):
    # TORCHTITAN_LIKE_FAULT=0:2:preempt sends SIGTERM after step 2's update, as a scheduler would.
    from tests.forking import run_cli_cases

    with_checkpoints, without = str(tmp_path / "with_checkpoints"), str(tmp_path / "without")
    preempt = {"TORCHTITAN_LIKE_FAULT": "0:2:preempt"}
    on_interval = str(tmp_path / "on_interval")
    results = run_cli_cases({
        "saved": {"args": run_args(with_checkpoints, steps=6, interval=100), "env": preempt},
        "not_saved": {"args": run_args(without, steps=6, interval=100)[:-5], "env": preempt},  # no --checkpoint.*
        # step 2 is also an (async) interval save: committed once, not written a second time
        "on_interval": {"args": run_args(on_interval, steps=6, interval=2) + ["--checkpoint.async_mode", "async"],
                        "env": preempt},
    }, case_timeout=120)
    for name, dump in (("saved", with_checkpoints), ("on_interval", on_interval)):
        assert results[name].returncode == PREEMPTED_EXIT_CODE, results[name].stderr[-3000:]
        assert "preempted: saved a checkpoint at step 2" in results[name].stderr
        assert [folder.step for folder in folders.complete_checkpoints(os.path.join(dump, "checkpoint"))] == [2]
    assert "preempted: saving step 2 and stopping" in results["saved"].stdout
    assert "preempted: step 2 was just saved; committing it" in results["on_interval"].stdout
    assert results["not_saved"].returncode == PREEMPTED_EXIT_CODE, results["not_saved"].stderr[-3000:]
    assert "nothing was saved (checkpoint.enable = false)" in results["not_saved"].stderr
    assert "saved a checkpoint" not in results["not_saved"].stderr

    # A relaunch whose model does not fit the checkpoint stops at the load: the run's config.toml stays.
    with open(os.path.join(with_checkpoints, "config.toml")) as handle:
        run_config = handle.read()
    mismatch = run_cli_cases({"mismatch": {"args": run_args(with_checkpoints, steps=6, interval=100)
                                           + ["--model.vocab_size", "512"]}}, case_timeout=120)["mismatch"]
    assert mismatch.returncode == 2, mismatch.stderr[-3000:]
    assert "does not fit the model" in mismatch.stderr
    with open(os.path.join(with_checkpoints, "config.toml")) as handle:
        assert handle.read() == run_config
