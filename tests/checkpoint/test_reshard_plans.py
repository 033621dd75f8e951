"""A run resumed under another parallel plan continues the original run: same losses, same weights.

Run A trains 6 steps under one plan (saving step-3 and step-6); run B starts from A's step-3 under
another plan with the same global batch (`checkpoint.initial_load_path`, full state, its own dump
folder) and trains steps 4 to 6. DCP reshards model and optimizer; the data position is resharded
from the global count of samples read (data/sampler.py), so B's ranks read together what A's did.

A launch spends most of its time starting up (imports, rendezvous), not computing, so the A runs
start together, then the B runs, and each launch forks its ranks from one interpreter that imported
torch and the trainer once (tests/forking.py) instead of starting them under torchrun.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.helpers import REPO_ROOT
from tests.helpers import launch as launch_process
from torchtitan_like.checkpoint import folders
from torchtitan_like.checkpoint.safe_storage import SafeFileSystemReader, SafeLoadPlanner, read_metadata
from torchtitan_like.checkpoint.state import decode_blob

GLOBAL_BATCH = 16
STEPS, RESUME_STEP = 6, 3
RTOL, ATOL = 1e-4, 1e-5  # fp32 on CPU: plans change only the order of floating-point reductions
LAUNCH_TIMEOUT_SECONDS = 150
FSDP4 = ("--parallelism.data_parallel_shard_degree", "4")
FSDP2_TP2 = ("--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2")
PP2 = ("--parallelism.pipeline_parallel_degree", "2")


@dataclass(frozen=True)
class Run:
    nproc: int
    data_parallel_degree: int  # local batch x data-parallel degree = GLOBAL_BATCH in every run
    plan: tuple[str, ...]
    resume_from: str = ""  # the run whose step-3 this one starts from


RUNS = {
    "fsdp4": Run(4, 4, FSDP4),
    "pp2": Run(2, 1, PP2),
    "fsdp2": Run(2, 2, ("--parallelism.data_parallel_shard_degree", "2")),
    "fsdp2_to_fsdp4": Run(4, 4, FSDP4, resume_from="fsdp2"),
    "fsdp4_to_fsdp2_x_tp2": Run(4, 2, FSDP2_TP2, resume_from="fsdp4"),
    "fsdp4_to_one_process": Run(1, 1, (), resume_from="fsdp4"),
    "pp2_to_one_process": Run(1, 1, (), resume_from="pp2"),
}


def launch(dump: str, nproc: int, local_batch_size: int, plan: tuple[str, ...], initial_load_path: str = "") -> None:
    """Train the tiny debug model on `nproc` gloo ranks (torchrun) or one process; fail on a hang."""
    args = ["--config", os.path.join(REPO_ROOT, "train_configs", "debug_model.toml"), "--job.dump_folder", dump,
            "--training.steps", str(STEPS), "--training.seq_len", "32", "--training.local_batch_size",
            str(local_batch_size), "--training.device", "cpu", "--lr_scheduler.warmup_steps", "1",
            "--validation.enable", "false", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
            # see tests/parallelisms/harness.py: keeps Adam from amplifying reduction-order rounding
            "--optimizer.eps", "1e-6", "--checkpoint.enable", "--checkpoint.interval", str(RESUME_STEP),
            "--checkpoint.last_save_model_only", "false", *plan]
    if initial_load_path:
        args += ["--checkpoint.initial_load_path", initial_load_path, "--checkpoint.initial_load_model_only", "false"]
    launch_process(["-m", "torchtitan_like.train", *args], nproc, LAUNCH_TIMEOUT_SECONDS, fork=True)


def read_section(path: str, section: str) -> dict[str, torch.Tensor]:
    """The full tensors of one top-level state of a checkpoint, read on this process without pickles."""
    prefix = section + "."
    state = {key[len(prefix):]: torch.empty(tuple(entry.size), dtype=entry.properties.dtype)
             for key, entry in read_metadata(path).state_dict_metadata.items()
             if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)}
    loaded = {section: state}
    dcp.load(loaded, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=True)
    return loaded[section]


def step_folder(dump: str, step: int) -> str:
    path = os.path.join(dump, "checkpoint", f"step-{step}")
    folders.check_complete(path)
    return path


def data_positions(path: str) -> set[tuple[int, int]]:
    """(epoch, samples of the epoch read by all ranks together) of every saved data-parallel rank."""
    return {(state["epoch"], state["consumed_in_epoch"])
            for state in (decode_blob(blob)["_sampler_iter_state"]["sampler_state"]
                          for blob in read_section(path, "dataloader").values())}


def assert_b_continues_a(dump_a: str, dump_b: str) -> None:
    final_a, final_b = step_folder(dump_a, STEPS), step_folder(dump_b, STEPS)
    losses_a = read_section(final_a, "train_state")["losses"]
    losses_b = read_section(final_b, "train_state")["losses"]
    assert len(losses_a) == len(losses_b) == STEPS
    assert torch.equal(losses_b[:RESUME_STEP], losses_a[:RESUME_STEP])  # restored from A's step-3
    torch.testing.assert_close(losses_b[RESUME_STEP:], losses_a[RESUME_STEP:], rtol=RTOL, atol=0.0)
    for section in ("model", "optimizer"):
        tensors_a, tensors_b = read_section(final_a, section), read_section(final_b, section)
        assert tensors_a.keys() == tensors_b.keys(), set(tensors_a) ^ set(tensors_b)
        for name, value in tensors_a.items():
            torch.testing.assert_close(tensors_b[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    assert data_positions(final_a) == data_positions(final_b) == {(0, STEPS * GLOBAL_BATCH)}


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, str | BaseException]:
    """Every run's dump folder, or the error of its launch (each test then fails on its own)."""
    root = tmp_path_factory.mktemp("reshard_plans")
    results: dict[str, str | BaseException] = {}

    def start(name: str) -> None:
        run = RUNS[name]
        initial = results[run.resume_from] if run.resume_from else ""
        if isinstance(initial, BaseException):
            raise RuntimeError(f"run {run.resume_from} failed") from initial
        launch(str(root / name), run.nproc, GLOBAL_BATCH // run.data_parallel_degree, run.plan,
               step_folder(initial, RESUME_STEP) if initial else "")

    for phase in ([name for name, run in RUNS.items() if not run.resume_from],
                  [name for name, run in RUNS.items() if run.resume_from]):
        with ThreadPoolExecutor(len(phase)) as pool:
            futures = {name: pool.submit(start, name) for name in phase}
        for name, future in futures.items():
            results[name] = future.exception() or str(root / name)
    return results


@pytest.mark.parametrize("resumed", ["fsdp2_to_fsdp4", "fsdp4_to_fsdp2_x_tp2",
                                     "fsdp4_to_one_process", "pp2_to_one_process"])
def test_a_run_resumed_under_another_plan_has_the_same_losses_weights_and_data_position(dumps, resumed):
    for name in (RUNS[resumed].resume_from, resumed):
        if isinstance(dumps[name], BaseException):
            raise RuntimeError(f"run {name} failed") from dumps[name]
    assert_b_continues_a(dumps[RUNS[resumed].resume_from], dumps[resumed])
