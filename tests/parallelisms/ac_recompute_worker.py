"""Worker for test_activation_checkpoint.py (2 gloo ranks, TP 2 with sequence parallel): counts the
ops that backward runs under each activation-checkpointing mode, collectives included, and prints
them as one JSON line per mode from rank 0."""

from __future__ import annotations

import collections
import dataclasses
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

from torchtitan_like.config.job_config import Float8
from torchtitan_like.kernels.float8 import convert_to_float8
from torchtitan_like.models.llama3 import Transformer
from torchtitan_like.models.llama3.args import get_flavor
from torchtitan_like.parallelisms.activation_checkpoint import apply_activation_checkpointing
from torchtitan_like.parallelisms.tensor_parallel import apply_tensor_parallel


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
    args = dataclasses.replace(get_flavor("debugmodel"), vocab_size=256)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    runs = [(mode, option, float8) for float8 in (False, True)
            for mode, option in (("none", "1"), ("full", "1"), ("selective", "op"))]
    for mode, option, float8 in runs:
        model = Transformer(args)
        if float8:  # emulated: its TP layers all-reduce their amaxes over the TP group
            convert_to_float8(model, Float8(enable=True, emulate=True))
        apply_tensor_parallel(model, mesh["tp"], loss_parallel_enabled=False)
        apply_activation_checkpointing(model.layers, mode, option)
        loss = model(tokens).float().mean()
        with CountOps() as counter:
            loss.backward()
        keys = ("aten.mm", "aten._scaled_dot_product_flash_attention_for_cpu", "_c10d_functional.all_reduce",
                "_c10d_functional.all_gather_into_tensor", "_c10d_functional.reduce_scatter_tensor")
        if dist.get_rank() == 0:
            name = f"{mode}/{option}" + ("/float8" if float8 else "")
            print("COUNTS " + json.dumps({"mode": name, **{key: counter.counts[key] for key in keys}}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
