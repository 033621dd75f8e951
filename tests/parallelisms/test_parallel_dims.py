"""Every invalid combination of parallel degrees stops at start-up with exit code 2 and a message
that names the keys, before any process group exists (so no rank can hang).

Each case runs the CLI as rank 0 of a job of WORLD_SIZE processes: validation reads the world size
from the environment and fails before the first collective, so one process is enough to prove it.
The cases run four at a time, each under a timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO_ROOT, tiny_overrides

CASE_TIMEOUT_SECONDS = 60

# name: (world size, overrides, a fragment the error message must contain)
INVALID_CASES = {
    "degrees_do_not_multiply_to_world_size": (
        1, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"],
        "the product must equal the number of processes"),
    "dp_shard_cannot_be_inferred": (3, ["--parallelism.tensor_parallel_degree", "2"], "cannot be inferred"),
    "tp_does_not_divide_heads": (3, ["--parallelism.tensor_parallel_degree", "3"], "does not divide the model's n_heads"),
    "tp_does_not_divide_kv_heads": (8, ["--parallelism.tensor_parallel_degree", "8"],
                                    "does not divide the model's n_kv_heads"),
    "layers_do_not_split_over_stages": (8, ["--parallelism.pipeline_parallel_degree", "8",
                                            "--training.local_batch_size", "8"], "cannot be split over 8 pipeline"),
    "layers_per_stage_does_not_divide_layers": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                                    "--parallelism.pipeline_parallel_layers_per_stage", "3"],
                                                "does not divide the model's n_layers"),
    "tied_head_over_pipeline_stages": (2, ["--parallelism.pipeline_parallel_degree", "2", "--model.flavor",
                                           "debugmodel_tied"], "set parallelism.pipeline_parallel_degree = 1"),
    "tp_does_not_divide_validation_seq_len": (2, ["--parallelism.tensor_parallel_degree", "2", "--validation.enable",
                                                  "true", "--validation.seq_len", "31"],
                                              "validation.seq_len = 31 must be divisible"),
    "zbv_schedule_with_validation": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                         "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble",
                                         "--validation.enable", "true", "--training.local_batch_size", "4"],
                                     "does not work with parallelism.pipeline_parallel_schedule"),
    "split_point_out_of_range": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                     "--parallelism.pipeline_parallel_split_points", '["layers.9"]'],
                                 "pipeline_parallel_split_points contains 'layers.9'"),
    "batch_does_not_divide_into_microbatches": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                                    "--training.local_batch_size", "4",
                                                    "--parallelism.pipeline_parallel_microbatch_size", "3"],
                                                "is not divisible by parallelism.pipeline_parallel_microbatch_size"),
    "fewer_microbatches_than_stages": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                           "--training.local_batch_size", "2",
                                           "--parallelism.pipeline_parallel_microbatch_size", "2"],
                                       "fewer than pipeline_parallel_degree"),
    "interleaved_microbatches_not_multiple_of_pp": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                                        "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B",
                                                        "--training.local_batch_size", "3"],
                                                    "to be a multiple of pipeline_parallel_degree"),
    "single_stage_schedule_with_two_stages_per_rank": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                                           "--parallelism.pipeline_parallel_layers_per_stage", "1"],
                                                       "runs one stage per rank"),
    "global_batch_not_multiple_of_dp_batches": (2, ["--parallelism.data_parallel_shard_degree", "2",
                                                    "--training.global_batch_size", "6"],
                                                "must be a multiple of"),
    "async_tp_on_cpu": (2, ["--parallelism.tensor_parallel_degree", "2",
                            "--parallelism.enable_async_tensor_parallel", "true", "--training.device", "cpu"],
                        "needs CUDA"),
    "cpu_offload_on_cpu": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.enable_cpu_offload", "true",
                               "--training.device", "cpu"],
                           "training.enable_cpu_offload = true keeps FSDP"),
}


def run_case(name: str, dump_folder: str) -> tuple[int | None, str]:
    world_size, overrides, _ = INVALID_CASES[name]
    env = dict(os.environ, WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0", OMP_NUM_THREADS="1")
    try:
        done = subprocess.run([sys.executable, "-m", "torchtitan_like.train", *tiny_overrides(dump_folder), *overrides],
                              capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=CASE_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {CASE_TIMEOUT_SECONDS}s"
    return done.returncode, done.stdout + done.stderr


@pytest.fixture(scope="module")
def invalid_case_results(tmp_path_factory):
    """Run the cases a few at a time (each is mostly interpreter start-up)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run_case, name, str(tmp_path_factory.mktemp(name))) for name in INVALID_CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_parallel_degrees_exit_2_with_message(invalid_case_results, case):
    returncode, output = invalid_case_results[case]
    assert returncode == 2, f"{case}: exit code {returncode}\n{output[-3000:]}"
    expected = INVALID_CASES[case][2]
    assert expected in output, f"{case}: message lacks {expected!r}:\n{output[-3000:]}"
    assert "Traceback" not in output
