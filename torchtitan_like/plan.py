"""Dry-run a parallel plan at any scale on one CPU machine: parameters, FLOPs and memory per rank.

    python -m torchtitan_like.plan --config train_configs/llama3_405b.toml --ngpu 512 \
        [--rank R] [--gpu-memory-gib 80] [--section.key value ...]

The model is built on the meta device (no memory), and the trainer's own plan (pipeline split,
tensor parallel, activation checkpointing, compile, FSDP) is applied for one rank of a fake process
group of `--ngpu` ranks (`FakeStore` + the "fake" backend: collectives are no-ops, no devices are
touched). Parameter counts per rank are read from the resulting DTensor shards; the memory estimate
is `plan_memory.py`'s (its docstring gives every formula).

Exit codes: 0 the plan fits the card, 3 (`DOES_NOT_FIT_EXIT_CODE`) it does not (the report says
which knobs help), 2 a config mistake (the same checks the trainer runs at start-up).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from torchtitan_like.config import gradient_accumulation_steps, load_config, validate_config
from torchtitan_like.errors import ConfigError, UserError, run_command
from torchtitan_like.models import get_model_spec
from torchtitan_like.parallelisms.fsdp import reshard_after_forward_policy
from torchtitan_like.parallelisms.parallel_dims import ParallelDims
from torchtitan_like.plan_memory import GIB, BlockShape, RankLayout, estimate_memory, suggestions
from torchtitan_like.startup import build_model_on_meta

DOES_NOT_FIT_EXIT_CODE = 3
CARD_NAMES = {80: "H100 80GB", 141: "H200 141GB"}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.plan", description=__doc__.split("\n\n")[0],
                                     epilog="Any other --section.key value pair overrides the config, as for training.")
    parser.add_argument("--config", required=True, help="training TOML (e.g. train_configs/llama3_70b.toml)")
    parser.add_argument("--ngpu", type=int, required=True, help="world size to plan for (GPUs over all nodes)")
    parser.add_argument("--rank", type=int, default=0, help="the rank to report (its pipeline stages, shards)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0,
                        help="memory of one GPU in GiB: 80 (H100, default), 141 (H200), ...")
    options, overrides = parser.parse_known_args(argv)
    if options.ngpu < 1:
        raise ConfigError(f"--ngpu {options.ngpu}: must be >= 1")
    if not 0 <= options.rank < options.ngpu:
        raise ConfigError(f"--rank {options.rank}: must be in [0, {options.ngpu - 1}] for --ngpu {options.ngpu}")
    if not (math.isfinite(options.gpu_memory_gib) and options.gpu_memory_gib > 0):  # nan fails every comparison
        raise ConfigError(f"--gpu-memory-gib {options.gpu_memory_gib}: must be a positive finite number")
    return options, overrides


def resolve_vocab(config, model_args) -> None:
    """The vocabulary by the trainer's rule (model.vocab_size, else the tokenizer's; a size below the
    tokenizer's is an error); a given model.vocab_size alone where the tokenizer files are absent."""
    from torchtitan_like.data import build_tokenizer
    from torchtitan_like.startup import resolve_model_args

    try:
        tokenizer = build_tokenizer(config.model)
    except UserError as error:
        if config.model.vocab_size == -1:
            raise ConfigError(f"{error}; or pass --model.vocab_size N to plan without the tokenizer files") from None
        # Planning a cluster run on a laptop that lacks the tokenizer: nothing to check the size against.
        model_args.vocab_size = config.model.vocab_size
        return
    model_args.vocab_size = resolve_model_args(config, tokenizer)[1].vocab_size


def _elements_after_tp(param: torch.Tensor, tp: int) -> float:
    """A parameter's elements once TP has split it (FSDP's sharding not applied)."""
    placements = getattr(param, "placements", None)
    mesh = getattr(param, "device_mesh", None)
    if tp == 1 or placements is None or not mesh.mesh_dim_names or "tp" not in mesh.mesh_dim_names:
        return float(param.numel())
    tp_placement = placements[mesh.mesh_dim_names.index("tp")]
    return param.numel() / tp if tp_placement.is_shard() else float(param.numel())


def _local_elements(param: torch.Tensor) -> int:
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


def build_rank(config, parallel_dims: ParallelDims, rank: int, spec, model_args) -> list[nn.Module]:
    """This rank's model parts with the full plan applied, under a fake process group."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=parallel_dims.world_size)
    # "cpu" meshes: the fake backend needs no devices, and the plan's layout does not depend on it.
    mesh = parallel_dims.build_mesh("cpu")
    model = build_model_on_meta(config, spec, model_args, parallel_dims)
    if parallel_dims.pp_enabled:
        from torchtitan_like.losses import cross_entropy_loss

        grad_accum_steps = gradient_accumulation_steps(config.training, parallel_dims.dp)
        pipeline = spec.pipelining_fn(model, parallel_dims, mesh, config, torch.device("cpu"), cross_entropy_loss,
                                      grad_accum_steps)
        return list(pipeline.model_parts)
    return [spec.parallelize_fn(model, parallel_dims, mesh, config)]


def rank_layout(parts: list[nn.Module], parallel_dims: ParallelDims, config) -> RankLayout:
    tp = parallel_dims.tp
    units, head_unit = [], 0.0
    for part in parts:
        if part.tok_embeddings is not None:
            units.append(sum(_elements_after_tp(p, tp) for p in part.tok_embeddings.parameters()))
        units += [sum(_elements_after_tp(p, tp) for p in block.parameters()) for block in part.layers.values()]
        head = [module for module in (part.norm, part.output) if module is not None]
        if head:
            head_unit = sum(_elements_after_tp(p, tp) for module in head for p in module.parameters())
            units.append(head_unit)
    return RankLayout(
        local_params=sum(_local_elements(p) for part in parts for p in part.parameters()),
        unit_params=units, head_unit_params=head_unit,
        blocks_on_rank=sum(len(part.layers) for part in parts),
        # Counted from the wrapped blocks: "every k-th layer" goes by global layer id, so a stage may
        # hold more or fewer than blocks_on_rank // k of them.
        checkpointed_blocks=sum(isinstance(block, CheckpointWrapper)
                                for part in parts for block in part.layers.values()),
        has_output=any(part.output is not None for part in parts), stages_on_rank=len(parts),
        tp=tp, pp=parallel_dims.pp, fsdp=parallel_dims.fsdp_enabled,
        reshard_after_forward=reshard_after_forward_policy(config.parallelism.fsdp_reshard_after_forward,
                                                           parallel_dims.pp_enabled))


def _stage_description(parts: list[nn.Module]) -> str:
    ranges = []
    for part in parts:
        layers = [int(name) for name in part.layers.keys()]
        ends = ("embedding + " if part.tok_embeddings is not None else "",
                " + norm/output" if part.output is not None else "")
        ranges.append(f"{ends[0]}layers {min(layers)}-{max(layers)}{ends[1]}" if layers else "no layers")
    return "; ".join(ranges)


def report(options, config, parallel_dims, model_args, parts, layout, estimate) -> bool:
    """Print the plan; return whether it fits the card."""
    training = config.training
    mesh = " x ".join(f"{name} {size}" for name, size in parallel_dims.mesh_shape()) or "single process"
    print(f"plan: {config.model.name} {config.model.flavor} on {options.ngpu} GPUs, rank {options.rank}")
    print(f"  mesh: {mesh}; schedule {config.parallelism.pipeline_parallel_schedule if parallel_dims.pp_enabled else '-'}; "
          f"activation checkpointing {config.activation_checkpoint.mode}"
          + (f" ({config.activation_checkpoint.selective_ac_option})" if config.activation_checkpoint.mode == "selective" else ""))
    print(f"  this rank runs: {_stage_description(parts)}")
    stage_params = sum(p.numel() for part in parts for p in part.parameters())
    print(f"  parameters: {model_args.num_params():,} total; {stage_params:,} in this rank's stage(s); "
          f"{layout.local_params:,} on this rank after sharding")
    tokens = training.local_batch_size * training.seq_len
    flops = model_args.flops_per_token(training.seq_len)
    print(f"  FLOPs per token (training, seq_len {training.seq_len}): {flops:.3e}; "
          f"{tokens:,} tokens per rank per microstep (local_batch_size {training.local_batch_size})")
    print("  memory per rank (estimate; formulas in torchtitan_like/plan_memory.py):")
    width = max(len(name) for name in estimate.components)
    for name, value in estimate.components.items():
        print(f"    {name:<{width}}  {value / GIB:8.2f} GiB")
    for note in estimate.notes:
        print(f"    note: {note}")
    card = CARD_NAMES.get(round(options.gpu_memory_gib), "GPU")
    total_gib = estimate.total / GIB
    fits = total_gib <= options.gpu_memory_gib
    verdict = (f"fits ({options.gpu_memory_gib - total_gib:.1f} GiB headroom)" if fits
               else f"DOES NOT FIT (over by {total_gib - options.gpu_memory_gib:.1f} GiB)")
    print(f"    {'total':<{width}}  {total_gib:8.2f} GiB of {options.gpu_memory_gib:g} GiB ({card}): {verdict}")
    if not fits:
        print("warning: this plan will run out of GPU memory; what helps, most effective first:")
        for hint in suggestions(estimate, layout, training, config.parallelism, config.activation_checkpoint):
            print(f"  - {hint}")
    return fits


def plan(argv: list[str]) -> int:
    options, overrides = parse_args(argv)
    config, _ = load_config(["--config", options.config, *overrides])
    spec = get_model_spec(config.model.name)
    model_args = spec.args_for(config.model.flavor)
    resolve_vocab(config, model_args)
    model_args.norm_type = config.model.norm_type
    # The same start-up checks as the trainer, for the requested world size and the GPUs it targets.
    validate_config(config, model_args)
    parallel_dims = ParallelDims.from_config(config.parallelism, options.ngpu)
    parallel_dims.validate_model(model_args, config.training, config.parallelism, config.validation)
    parallel_dims.validate_features(config.parallelism, config.compile, "cuda",
                                  cpu_offload=config.training.enable_cpu_offload,
                                  master_weights=config.training.master_weights,
                                  activation_checkpoint=config.activation_checkpoint)
    # Neither changes a shape or a saved tensor's size, and both would cost time or real devices:
    # async TP registers symmetric memory with an NCCL group; compile imports and sets up Dynamo.
    config.parallelism.enable_async_tensor_parallel = False
    config.compile.enable = False
    try:
        parts = build_rank(config, parallel_dims, options.rank, spec, model_args)
        layout = rank_layout(parts, parallel_dims, config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    shape = BlockShape(dim=model_args.dim, kv_dim=model_args.kv_heads * model_args.head_dim,
                       ffn_hidden_dim=model_args.ffn_hidden_dim, vocab_size=model_args.vocab_size)
    estimate = estimate_memory(shape, layout, config.training, config.parallelism, config.activation_checkpoint,
                               config.model.attn_mask_type)
    fits = report(options, config, parallel_dims, model_args, parts, layout, estimate)
    return 0 if fits else DOES_NOT_FIT_EXIT_CODE


def main(argv: list[str] | None = None) -> int:
    return run_command(plan, argv)


if __name__ == "__main__":
    sys.exit(main())
