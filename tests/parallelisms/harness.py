"""Parity harness: run parallel plans on N gloo ranks (with a timeout) and compare each plan's
per-step losses and final parameters with a single-process run of the same seed and data.

Every plan is declared once in `PLANS`. Starting a process costs more than training the tiny model,
so all plans of one world size run in one launch (`launch_world`), once per test session; each test
then checks its own plan's results. The ranks are forked, with torchrun's environment, from one
interpreter that imported torch and the trainer once (tests/forking.py); torchrun itself is tested
by tests/checkpoint/test_resume.py.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import torch

from tests.helpers import REPO_ROOT, launch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_plan.py")
STEPS = 5
# fp32 on CPU: parallel plans change only the order of floating-point reductions.
RTOL = 1e-4
ATOL = 1e-5  # for parameters that are near zero, where a relative tolerance alone is meaningless
LAUNCH_TIMEOUT_SECONDS = 300


@dataclass(frozen=True)
class Plan:
    nproc: int
    reference_batch_size: int  # the single-process batch equal to the union of the DP batches
    overrides: tuple[str, ...] = ()
    local_batch_size: int = 4
    reference: str = ""  # the plan to compare against; default f"reference_batch{reference_batch_size}"
    validate: bool = False  # also evaluate the trained model on the validation split (validation.pt)

    def reference_name(self) -> str:
        return self.reference or f"reference_batch{self.reference_batch_size}"


PP2 = ("--parallelism.pipeline_parallel_degree", "2")
# emulated fp8 (fp32 matmuls of fp8-rounded operands): under TP the layers run on local shards with
# amaxes reduced over the TP group, so every operand is cast with the single process's scale
FLOAT8 = ("--float8.enable", "true", "--float8.emulate", "true")
# graph capture and AOT autograd without the slow C++ code generation of Inductor on CPU
COMPILE_AOT_EAGER = ("--compile.enable", "true", "--compile.backend", "aot_eager")
# Packed samples of many short documents (the built-in corpus's are longer than a 32-token sample):
# a block-causal mask with several documents in every sample. `{out_dir}`: the launch's folder.
SHORT_DOCUMENTS = ("--training.dataset", "local", "--training.dataset_path", "{out_dir}/short_documents.jsonl",
                   "--validation.dataset", "local", "--validation.dataset_path", "{out_dir}/short_documents.jsonl")
BLOCK_CAUSAL = ("--model.attn_mask_type", "block_causal", *SHORT_DOCUMENTS)
PLANS: dict[str, Plan] = {
    # single-process references, then one-process plans compared against them
    "reference_batch4": Plan(1, 4, validate=True),
    "reference_batch8": Plan(1, 8, local_batch_size=8),
    "reference_batch16": Plan(1, 16, local_batch_size=16),
    "reference_batch4_float8": Plan(1, 4, FLOAT8),
    "reference_batch8_float8_rowwise": Plan(1, 8, (*FLOAT8, "--float8.recipe_name", "rowwise"), local_batch_size=8),
    # fp8 scales are per GEMM call, so pipelined fp8 (4 microbatches of 1) matches accumulation of 4 x 1
    "reference_microbatch1_float8": Plan(1, 4, (*FLOAT8, "--training.global_batch_size", "4"), local_batch_size=1),
    # the LM head tied to the embedding (as the 1B and 3B flavors): one Parameter, whatever the plan
    "reference_batch8_tied": Plan(1, 8, ("--model.flavor", "debugmodel_tied"), local_batch_size=8),
    "grad_accumulation_2": Plan(1, 8, ("--training.global_batch_size", "8")),
    "reference_batch4_short_documents": Plan(1, 4, SHORT_DOCUMENTS),
    "reference_batch4_block_causal": Plan(1, 4, BLOCK_CAUSAL, validate=True),
    "ac_full": Plan(1, 4, ("--activation_checkpoint.mode", "full")),
    "ac_selective_every_2nd_layer": Plan(1, 4, ("--activation_checkpoint.mode", "selective",
                                                "--activation_checkpoint.selective_ac_option", "2")),
    "ac_selective_per_op": Plan(1, 4, ("--activation_checkpoint.mode", "selective",
                                       "--activation_checkpoint.selective_ac_option", "op")),
    # 2 processes
    "fsdp2": Plan(2, 8, ("--parallelism.data_parallel_shard_degree", "2")),
    # per-block compile (aot_eager) over fp8 layers: FSDP2 hands the compiled blocks the gathered
    # fp8 weight subclass; the eager path is tested layer by layer in tests/kernels/test_float8_fsdp.py
    "fsdp2_float8": Plan(2, 8, ("--parallelism.data_parallel_shard_degree", "2", *FLOAT8, *COMPILE_AOT_EAGER)),
    # weights all-gathered already in fp8, with precomputed scales: the same fp8 bits as fsdp2_float8
    "fsdp2_float8_all_gather": Plan(2, 8, ("--parallelism.data_parallel_shard_degree", "2", *FLOAT8,
                                           *COMPILE_AOT_EAGER, "--float8.enable_fsdp_float8_all_gather", "true",
                                           "--float8.precompute_float8_dynamic_scale_for_fsdp", "true"),
                                    reference="fsdp2_float8"),
    # fused AdamW on the DTensor shards applies the gradient clip in its kernel (grad_clip.py); the
    # reference clips in place and steps with foreach
    "fsdp2_fused_adamw": Plan(2, 8, ("--parallelism.data_parallel_shard_degree", "2",
                                     "--optimizer.implementation", "fused")),
    # also evaluates: the validation loss of vocab-sharded logits under loss parallel
    "tp2": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2"), validate=True),
    "tp2_float8": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2", *FLOAT8),
                       reference="reference_batch4_float8"),
    # per-op AC over TP Float8 layers: saved GEMMs, reduce-scatters and amax all-reduces change no value
    "tp2_float8_selective_op_ac": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2", *FLOAT8,
                                              "--activation_checkpoint.mode", "selective",
                                              "--activation_checkpoint.selective_ac_option", "op"),
                                       reference="tp2_float8"),
    # per-block compile over TP: the blocks' inputs and outputs are local shards of DTensors
    "tp2_compile": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2", *COMPILE_AOT_EAGER)),
    # ... recomputed whole by full AC: on CPU only with the math attention kernel (parallel_dims.py)
    "tp2_compile_full_ac_math_attention": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2", *COMPILE_AOT_EAGER,
                                                      "--activation_checkpoint.mode", "full",
                                                      "--model.sdpa_backend", "math")),
    # the mask, made from the whole sample's tokens on every rank, through TP, compiled blocks and per-op AC
    "tp2_block_causal_compile_selective_op_ac": Plan(2, 4, ("--parallelism.tensor_parallel_degree", "2", *BLOCK_CAUSAL,
                                                            *COMPILE_AOT_EAGER, "--activation_checkpoint.mode",
                                                            "selective", "--activation_checkpoint.selective_ac_option",
                                                            "op"), reference="reference_batch4_block_causal"),
    # every stage builds the mask from its microbatch's tokens, on 4 stages of 1 layer
    "pp2_interleaved_1f1b_block_causal": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule",
                                                     "Interleaved1F1B", *BLOCK_CAUSAL),
                                              reference="reference_batch4_block_causal", validate=True),
    # ... and the split backward (input, then weight gradients) of a zero-bubble schedule
    "pp2_interleaved_zero_bubble_block_causal": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule",
                                                            "InterleavedZeroBubble", *BLOCK_CAUSAL),
                                                     reference="reference_batch4_block_causal"),
    "pp2_gpipe": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule", "GPipe")),
    "pp2_1f1b": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule", "1F1B"), validate=True),
    # 2 virtual stages per rank: 4 stages of 1 layer
    "pp2_interleaved_1f1b": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule", "Interleaved1F1B"),
                                 validate=True),
    # uneven split (1 + 3 layers), 2 microbatches of 2 samples, 2 accumulation steps
    "pp2_split_point_grad_accumulation": Plan(2, 8, (*PP2, "--parallelism.pipeline_parallel_split_points",
                                                     '["layers.1"]', "--parallelism.pipeline_parallel_microbatch_size",
                                                     "2", "--training.global_batch_size", "8")),
    # V-shaped zero-bubble schedule: stages (0, 3) on rank 0, (1, 2) on rank 1
    "pp2_zbv_zero_bubble": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule", "ZBVZeroBubble")),
    "pp2_float8": Plan(2, 4, (*PP2, *FLOAT8), reference="reference_microbatch1_float8"),
    # looped schedules with 2 virtual stages per rank: breadth-first, and zero-bubble (split backward)
    "pp2_looped_bfs": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule", "LoopedBFS")),
    "pp2_interleaved_zero_bubble": Plan(2, 4, (*PP2, "--parallelism.pipeline_parallel_schedule",
                                               "InterleavedZeroBubble")),
    # per-block compile (aot_eager: the graph capture without slow C++ codegen) over per-op AC and FSDP
    "fsdp2_compile_selective_op_ac": Plan(2, 8, ("--parallelism.data_parallel_shard_degree", "2",
                                                 "--compile.enable", "true", "--compile.backend", "aot_eager",
                                                 "--activation_checkpoint.mode", "selective",
                                                 "--activation_checkpoint.selective_ac_option", "op")),
    # 4 processes
    "fsdp4": Plan(4, 16, ("--parallelism.data_parallel_shard_degree", "4")),
    "hsdp_2x2": Plan(4, 16, ("--parallelism.data_parallel_replicate_degree", "2",
                             "--parallelism.data_parallel_shard_degree", "2")),
    "fsdp2_x_tp2": Plan(4, 8, ("--parallelism.data_parallel_shard_degree", "2",
                               "--parallelism.tensor_parallel_degree", "2")),
    "fsdp2_x_tp2_float8_rowwise": Plan(4, 8, ("--parallelism.data_parallel_shard_degree", "2",
                                              "--parallelism.tensor_parallel_degree", "2", *FLOAT8,
                                              "--float8.recipe_name", "rowwise", *COMPILE_AOT_EAGER),
                                       reference="reference_batch8_float8_rowwise"),
    "fsdp2_x_tp2_no_loss_parallel": Plan(4, 8, ("--parallelism.data_parallel_shard_degree", "2",
                                                "--parallelism.tensor_parallel_degree", "2",
                                                "--parallelism.disable_loss_parallel", "true")),
    # the tied Parameter sharded on the vocab dim by TP, then in the head's FSDP unit
    "fsdp2_x_tp2_tied": Plan(4, 8, ("--parallelism.data_parallel_shard_degree", "2",
                                    "--parallelism.tensor_parallel_degree", "2", "--model.flavor", "debugmodel_tied"),
                             reference="reference_batch8_tied"),
    "pp2_x_fsdp2": Plan(4, 8, (*PP2, "--parallelism.data_parallel_shard_degree", "2")),
    "pp2_x_tp2": Plan(4, 4, (*PP2, "--parallelism.tensor_parallel_degree", "2"), validate=True),
    # 8 processes
    "pp2_x_fsdp2_x_tp2": Plan(8, 8, (*PP2, "--parallelism.data_parallel_shard_degree", "2",
                                     "--parallelism.tensor_parallel_degree", "2")),
}


# 2 batches of 8 x 16 tokens from the validation split, evaluated after the last step (run_plan.py):
# another batch size and sequence length than training's 4 x 32, so a pipeline evaluates microbatches
# of another shape than it trains on (parallelisms/pipeline.py: pipeline_evaluate)
VALIDATION = ("--validation.enable", "true", "--validation.steps", "2", "--validation.freq", "1000",
              "--validation.seq_len", "16")


def plan_overrides(plan: Plan) -> list[str]:
    """A tiny debug-model run: 5 steps of local_batch_size x 32 tokens per data-parallel rank, fp32."""
    return ["--config", os.path.join(REPO_ROOT, "train_configs", "debug_model.toml"),
            "--training.steps", str(STEPS), "--training.seq_len", "32",
            "--training.local_batch_size", str(plan.local_batch_size), "--training.device", "cpu",
            "--lr_scheduler.warmup_steps", "1", "--validation.enable", "false", "--metrics.log_freq", "1",
            "--metrics.enable_tensorboard", "false",
            # Adam divides by sqrt(v) + eps: with the default 1e-8, an element whose gradient is a
            # near-total cancellation (~1e-9) moves by ~lr whatever the rounding of that sum, so a
            # different reduction order shows up as a 1e-5 parameter difference. 1e-6 keeps the
            # comparison about the parallel plan, not about amplified rounding.
            "--optimizer.eps", "1e-6", *VALIDATION * plan.validate, *plan.overrides]


def write_short_documents(path: str, count: int = 400) -> None:
    """`count` JSON-lines documents of 1 to 4 short words (1 to 27 bytes), the same in every launch."""
    import random

    words = ["the", "model", "learns", "a", "short", "text", "of", "tokens", "and", "stops", "here", "now"]
    chooser = random.Random(0)
    with open(path, "w") as handle:
        for _ in range(count):
            text = " ".join(chooser.choice(words) for _ in range(chooser.randint(1, 4)))
            handle.write(json.dumps({"text": text}) + "\n")


def launch_world(out_dir: str, nproc: int, plan_names: list[str]) -> None:
    """Run the named plans on `nproc` gloo ranks in one launch; a hang or crash fails the caller."""
    os.makedirs(out_dir, exist_ok=True)
    write_short_documents(os.path.join(out_dir, "short_documents.jsonl"))
    spec_path = os.path.join(out_dir, "spec.json")
    plans = {name: [item.replace("{out_dir}", out_dir) for item in plan_overrides(PLANS[name])] for name in plan_names}
    with open(spec_path, "w") as handle:
        json.dump({"out_dir": out_dir, "plans": plans}, handle)
    launch([WORKER, spec_path], nproc, LAUNCH_TIMEOUT_SECONDS, fork=True)


def load_results(plan_dir: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    """(rank 0's per-step losses, every parameter: the union of the ranks' stages)."""
    losses = torch.load(os.path.join(plan_dir, "losses.pt"))
    params: dict[str, torch.Tensor] = {}
    for path in sorted(glob.glob(os.path.join(plan_dir, "params_rank*.pt"))):
        params.update(torch.load(path))
    return losses, params


def load_validation_loss(plan_dir: str) -> float:
    """Rank 0's validation loss of the trained model (a plan with `validate`)."""
    return torch.load(os.path.join(plan_dir, "validation.pt"))


def load_structure(plan_dir: str) -> list[dict]:
    """Every rank's description of what the plan did to its modules (run_plan.describe), by rank."""
    paths = glob.glob(os.path.join(plan_dir, "structure_rank*.json"))
    by_rank = {int(path.rsplit("structure_rank", 1)[1].split(".")[0]): path for path in paths}
    structures = []
    for rank in sorted(by_rank):
        with open(by_rank[rank]) as handle:
            structures.append(json.load(handle))
    return structures


def assert_same_training(actual: tuple, expected: tuple) -> None:
    """Losses of every step and every final parameter equal within RTOL (and ATOL for params)."""
    actual_losses, actual_params = actual
    expected_losses, expected_params = expected
    assert len(actual_losses) == STEPS
    torch.testing.assert_close(torch.tensor(actual_losses), torch.tensor(expected_losses), rtol=RTOL, atol=0.0)
    assert set(actual_params) == set(expected_params), set(actual_params) ^ set(expected_params)
    for name, value in expected_params.items():
        torch.testing.assert_close(actual_params[name], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
