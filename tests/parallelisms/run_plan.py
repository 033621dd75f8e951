"""Worker launched by `torchrun` (or plain python for one process) from the parity harness.

usage: python run_plan.py SPEC.json    with SPEC = {"out_dir": DIR, "plans": {NAME: [--section.key, value, ...]}}

Runs the plans one after another in the same process group (starting processes dominates the cost
of these tiny runs). For each plan every rank writes `DIR/NAME/params_rank{R}.pt` (its stages'
parameters, gathered over the DTensor meshes, under their plain names) and rank 0 writes
`DIR/NAME/losses.pt`.
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


def run_one(plan_dir: str, overrides: list[str]) -> None:
    config, _ = load_config([*overrides, "--job.dump_folder", plan_dir])
    trainer = Trainer(config)
    losses = trainer.train()
    params = {}
    for part in trainer.model_parts:
        for name, param in part.named_parameters():
            params[plain_name(name)] = full_tensor(param.detach()).cpu().clone()
    rank = int(os.environ.get("RANK", "0"))
    torch.save(params, os.path.join(plan_dir, f"params_rank{rank}.pt"))
    if rank == 0:
        torch.save(losses, os.path.join(plan_dir, "losses.pt"))
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
