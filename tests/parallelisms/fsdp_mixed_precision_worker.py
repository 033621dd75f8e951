"""Worker for test_fsdp.py (2 gloo ranks): the debug model under FSDP2 with bf16 compute, as on a
GPU (the trainer keeps CPU runs in fp32), against one process computing with the same bf16
parameters. Prints, from rank 0, one JSON line: the largest logit difference and the dtypes that
reached the first block's attention."""

from __future__ import annotations

import dataclasses
import json

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from torchtitan_like.models.llama3 import Transformer
from torchtitan_like.models.llama3.args import get_flavor
from torchtitan_like.parallelisms.fsdp import apply_fsdp


def build(args) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    return model


def materialize(model: Transformer) -> None:
    model.to_empty(device="cpu")
    model.init_weights(seed=0, buffer_device=torch.device("cpu"))


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("dp_shard",))
    args = dataclasses.replace(get_flavor("debugmodel"), vocab_size=256)
    # positions far enough out that a bf16-rounded cos/sin table moves the rotation visibly
    tokens = torch.randint(0, 256, (2, 512), generator=torch.Generator().manual_seed(0))

    # one process: bf16 parameters, the fp32 RoPE buffer as built
    reference = build(args)
    materialize(reference)
    for param in reference.parameters():
        param.data = param.data.to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(tokens)

    sharded = build(args)
    units = [sharded.tok_embeddings, *sharded.layers.values(), [sharded.norm, sharded.output]]
    apply_fsdp(sharded, units, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
               reshard_after_forward=True, cpu_offload=False)
    materialize(sharded)
    seen = []
    sharded.layers["0"].attention.register_forward_pre_hook(
        lambda module, inputs: seen.append([str(tensor.dtype) for tensor in inputs if tensor is not None]))
    with torch.no_grad():
        logits = sharded(tokens)

    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"max_logit_difference": float((logits.float() - expected.float()).abs().max()),
                                      "logits_dtype": str(logits.dtype), "attention_input_dtypes": seen[0]}),
              flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
