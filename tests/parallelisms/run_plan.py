"""Worker launched by `torchrun` (or plain python for one process) from the parity harness.

usage: python run_plan.py SPEC.json    with SPEC = {"out_dir": DIR, "plans": {NAME: [--section.key, value, ...]}}

Runs the plans one after another in the same process group (starting processes dominates the cost
of these tiny runs). For each plan every rank writes `DIR/NAME/params_rank{R}.pt` (its stages'
parameters, gathered over the DTensor meshes, under their plain names) and rank 0 writes
`DIR/NAME/losses.pt` (and, with validation enabled, `validation.pt`: the trained model's validation
loss), and every rank `DIR/NAME/structure_rank{R}.json` (what the plan did to its modules: sharded
parameters, checkpointed and compiled blocks, Float8 layers).
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch

from torchtitan_like.config import load_config
from torchtitan_like.distributed.setup import destroy_process_group
from torchtitan_like.distributed.tensors import full_tensor
from torchtitan_like.trainer import Trainer


def plain_name(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def describe(trainer: Trainer) -> dict:
    """What the plan did to this rank's modules: parity alone cannot see a parallelism that was
    silently not applied when it does not change the numbers (TP, AC, compile)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    blocks = [block for part in trainer.model_parts for block in part.layers.values()]
    sharding = {}
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            if hasattr(param, "placements"):
                # FSDP over TP's Shard(0) shards dim 0 again as a _StridedShard: both are "Shard(0)" here
                sharding[plain_name(name)] = [
                    f"{dim}:Shard({placement.dim})" if hasattr(placement, "dim") else f"{dim}:{type(placement).__name__}"
                    for dim, placement in zip(param.device_mesh.mesh_dim_names, param.placements)]
    return {"blocks": len(blocks),
            "checkpointed_blocks": sum(isinstance(block, CheckpointWrapper) for block in blocks),
            "compiled_blocks": sum(getattr(block, "_compiled_call_impl", None) is not None for block in blocks),
            # the LM head still uses the embedding's Parameter (None: no part holds both)
            "tied_head": next((part.output.weight is part.tok_embeddings.weight for part in trainer.model_parts
                               if part.output is not None and part.tok_embeddings is not None), None),
            "float8_linears": sum(type(module).__name__ == "Float8Linear"
                                  for part in trainer.model_parts for module in part.modules()),
            "sharding": sharding}


def run_one(plan_dir: str, overrides: list[str]) -> None:
    config, _ = load_config([*overrides, "--job.dump_folder", plan_dir])
    trainer = Trainer(config)
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(plan_dir, f"structure_rank{rank}.json"), "w") as handle:
        json.dump(describe(trainer), handle)
    losses = trainer.train()
    params = {}
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            params[plain_name(name)] = full_tensor(param.detach()).cpu().clone()
    torch.save(params, os.path.join(plan_dir, f"params_rank{rank}.pt"))
    if rank == 0:
        torch.save(losses, os.path.join(plan_dir, "losses.pt"))
    if config.validation.enable:
        validation_loss = trainer.validate()  # every rank takes part (pipeline stages, TP shards)
        if rank == 0:
            torch.save(validation_loss, os.path.join(plan_dir, "validation.pt"))
    trainer.metrics.close()  # the process group stays up for the next plan


def main(spec_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    try:
        for name, overrides in spec["plans"].items():
            plan_dir = os.path.join(spec["out_dir"], name)
            os.makedirs(plan_dir, exist_ok=True)
            run_one(plan_dir, overrides)
            gc.collect()
    finally:
        destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
