"""Llama 3's parallel plan: tensor parallel, then activation checkpointing, then per-block
compile, then FSDP. Applied to the whole model or to one pipeline stage (modules a stage does not
own are None). The order matters: TP rewrites the linears into DTensor modules that AC and compile
then wrap; FSDP comes last so that it shards the TP-sharded parameters over the data-parallel dims
and its per-block hooks sit outside the compiled and checkpointed regions.
"""

from __future__ import annotations

import torch
from torch import nn

from torchtitan_like.parallelisms.activation_checkpoint import apply_activation_checkpointing
from torchtitan_like.parallelisms.compile import apply_compile
from torchtitan_like.parallelisms.fsdp import apply_fsdp, reshard_after_forward_policy
from torchtitan_like.parallelisms.tensor_parallel import apply_tensor_parallel, enable_async_tensor_parallel

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def parallelize_llama(model: nn.Module, parallel_dims, mesh, job_config) -> nn.Module:
    """Apply every enabled parallelism to `model` (on the meta device) in place and return it."""
    parallelism, training = job_config.parallelism, job_config.training
    compile_model = job_config.compile.enable and "model" in job_config.compile.components
    on_cuda = mesh is not None and mesh.device_type == "cuda"

    if parallel_dims.tp_enabled:
        apply_tensor_parallel(model, mesh["tp"], loss_parallel_enabled=not parallelism.disable_loss_parallel)
        if parallelism.enable_async_tensor_parallel:
            enable_async_tensor_parallel(mesh["tp"])
        # The embedding and the head are both sharded on the vocab dim (Shard(0)): one DTensor serves both.
        model.tie_weights()

    apply_activation_checkpointing(model.layers, job_config.activation_checkpoint.mode,
                                   job_config.activation_checkpoint.selective_ac_option)

    if compile_model:
        apply_compile(model.layers, job_config.compile.backend)

    if parallel_dims.fsdp_enabled:
        dp_mesh_names = ("dp_replicate", "dp_shard") if parallel_dims.hsdp_enabled else ("dp_shard",)
        # CPU collectives (gloo) are unreliable in bf16, so CPU runs keep fp32 end to end.
        param_dtype = _DTYPES[training.mixed_precision_param] if on_cuda else torch.float32
        reduce_dtype = _DTYPES[training.mixed_precision_reduce] if on_cuda else torch.float32
        # A tied embedding shares its Parameter with the head, and FSDP2 keeps a shared Parameter
        # only within one unit: then the embedding joins the head's unit.
        tied = model.args.tie_word_embeddings
        units = [] if model.tok_embeddings is None or tied else [model.tok_embeddings]
        units += list(model.layers.values())
        head = [module for module in (model.tok_embeddings if tied else None, model.norm, model.output)
                if module is not None]
        if head:
            units.append(head)
        apply_fsdp(model, units, mesh[dp_mesh_names], param_dtype, reduce_dtype,
                   reshard_after_forward=reshard_after_forward_policy(parallelism.fsdp_reshard_after_forward,
                                                                      parallel_dims.pp_enabled),
                   cpu_offload=training.enable_cpu_offload,
                   last_unit_reshard=(False if head and parallelism.fsdp_reshard_after_forward == "default" else None))
    return model
