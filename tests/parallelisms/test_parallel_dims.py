"""Every invalid combination of parallel degrees stops at start-up with exit code 2 and a message
that names the keys, before any process group exists (so no rank can hang).

Each case runs the CLI as rank 0 of a job of WORLD_SIZE processes: validation reads the world size
from the environment and fails before the first collective, so one process is enough to prove it.
The cases are forked from one interpreter that imported the trainer once (tests/forking.py: start-up
is almost all of a case's time), each under a timeout.
"""

from __future__ import annotations

import pytest

from tests.forking import run_cli_cases
from tests.helpers import tiny_overrides
from torchtitan_like.errors import ConfigError

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
    "tp_does_not_divide_vocab": (4, ["--parallelism.tensor_parallel_degree", "4"],  # 258 byte-level tokens
                                 "vocab_size (258); choose a degree that divides it, or pad the vocabulary: "
                                 "model.vocab_size = 260"),
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
    # zero-bubble schedules walk each backward graph twice (input, then weight gradients): compiled
    # blocks (compiled in place, which torch's own check misses) and per-op AC failed at step 1
    "zero_bubble_schedule_with_compile": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                              "--parallelism.pipeline_parallel_schedule", "InterleavedZeroBubble",
                                              "--compile.enable", "true", "--compile.backend", "aot_eager"],
                                          "which torch.compile'd code does not support"),
    "zero_bubble_schedule_with_per_op_ac": (2, ["--parallelism.pipeline_parallel_degree", "2",
                                                "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble",
                                                "--activation_checkpoint.mode", "selective",
                                                "--activation_checkpoint.selective_ac_option", "op"],
                                            "allows one backward per block"),
    # ... and FSDP's reshard after forward made it compute no weight gradient for the resharded units
    "zero_bubble_schedule_with_fsdp_reshard_after_forward": (4, ["--parallelism.pipeline_parallel_degree", "2",
                                                                 "--parallelism.pipeline_parallel_schedule",
                                                                 "InterleavedZeroBubble",
                                                                 "--parallelism.fsdp_reshard_after_forward", "always"],
                                                             "silently loses weight gradients"),
    # compiled TP blocks recomputed whole by AC: torch 2.13 misorders the CPU flash attention's saved
    # RNG state after the saved DeviceMesh and failed at the first forward (the math kernel trains:
    # plan tp2_compile_full_ac_math_attention)
    "tp_compile_full_ac_with_cpu_flash_attention": (2, ["--parallelism.tensor_parallel_degree", "2",
                                                        "--compile.enable", "true", "--compile.backend", "aot_eager",
                                                        "--activation_checkpoint.mode", "full",
                                                        "--training.device", "cpu"],
                                                    'set model.sdpa_backend = "math"'),
    "cpu_offload_on_cpu": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.enable_cpu_offload", "true",
                               "--training.device", "cpu"],
                           "training.enable_cpu_offload = true keeps FSDP"),
}


@pytest.fixture(scope="module")
def invalid_case_results(tmp_path_factory):
    """{case: (returncode, stdout + stderr)} of every case, run as rank 0 of a WORLD_SIZE-process job."""
    cases = {name: {"args": [*tiny_overrides(str(tmp_path_factory.mktemp(name))), *overrides],
                    "env": {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}}
             for name, (world_size, overrides, _) in INVALID_CASES.items()}
    results = run_cli_cases(cases, CASE_TIMEOUT_SECONDS)
    return {name: (result.returncode, ("" if result.returncode is not None else
                                       f"timed out after {CASE_TIMEOUT_SECONDS}s\n") + result.stdout + result.stderr)
            for name, result in results.items()}


@pytest.mark.parametrize("case", list(INVALID_CASES))
def test_invalid_parallel_degrees_exit_2_with_message(invalid_case_results, case):
    returncode, output = invalid_case_results[case]
    assert returncode == 2, f"{case}: exit code {returncode}\n{output[-3000:]}"
    expected = INVALID_CASES[case][2]
    assert expected in output, f"{case}: message lacks {expected!r}:\n{output[-3000:]}"
    assert "Traceback" not in output


def test_zero_bubble_refusals_leave_the_combinations_that_train_alone():
    """Compile, per-op AC and resharding after forward stay allowed with the schedules that run one
    full backward per microbatch; zero-bubble schedules keep full and every-k-th-layer AC and FSDP's
    default (no reshard under PP) and 'never' policies (all match one process)."""
    from types import SimpleNamespace

    from torchtitan_like.parallelisms.parallel_dims import ParallelDims

    def parallelism(schedule, reshard):
        return SimpleNamespace(pipeline_parallel_schedule=schedule, fsdp_reshard_after_forward=reshard,
                               enable_async_tensor_parallel=False)

    pp_fsdp = ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=2, world_size=4)
    compiled = SimpleNamespace(enable=True, components=["model", "loss"])
    not_compiled = SimpleNamespace(enable=False, components=["model", "loss"])
    per_op = SimpleNamespace(mode="selective", selective_ac_option="op")
    refused = []

    def check(dims, name, *args, **kwargs):
        try:
            dims.validate_features(*args, **kwargs)
        except ConfigError as error:
            refused.append(f"{name}: {error}")

    for schedule in ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS"):
        check(pp_fsdp, f"{schedule} compiled, per-op AC, reshard always", parallelism(schedule, "always"), compiled,
              "cpu", activation_checkpoint=per_op)
    for schedule in ("InterleavedZeroBubble", "ZBVZeroBubble"):
        for reshard in ("default", "never"):
            for mode, option in (("none", "op"), ("full", "op"), ("selective", "2")):
                check(pp_fsdp, f"{schedule} reshard {reshard}, AC {mode} {option}", parallelism(schedule, reshard),
                      not_compiled, "cpu", activation_checkpoint=SimpleNamespace(mode=mode, selective_ac_option=option))
        # without FSDP there is nothing to reshard
        check(ParallelDims(dp_replicate=1, dp_shard=1, tp=1, pp=2, world_size=2), f"{schedule} without FSDP",
              parallelism(schedule, "always"), not_compiled, "cpu")
    assert refused == []
