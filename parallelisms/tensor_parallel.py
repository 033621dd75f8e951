"""Tensor parallel with sequence parallel (Megatron-LM, Korthikanti et al. 2022) on DTensor.

Inside a block, each rank holds a slice of the heads and of the FFN width: `wq/wk/wv/w1/w3` are
split by output columns (`ColwiseParallel`), `wo/w2` by input rows (`RowwiseParallel`), so one
all-reduce per sub-layer suffices. Sequence parallel splits the activations *between* those
sub-layers (norms, residual adds) along the sequence dim, turning each all-reduce into a
reduce-scatter + all-gather pair and cutting activation memory by the TP degree.

Layouts along a block (tp ranks; `Shard(1)` = split over the sequence):

    x: Shard(1) -> attention_norm (SequenceParallel) -> all-gather -> Replicate
      -> wq/wk/wv (Colwise: local heads) -> attention on local heads -> wo (Rowwise)
      -> reduce-scatter -> Shard(1) -> + residual -> ffn_norm ... same for w1/w3, w2.

The embedding is row-sharded over the vocabulary and emits `Shard(1)`; the output projection is
column-sharded over the vocabulary, so with loss parallel the logits stay `Shard(-1)` and the
cross-entropy runs on the local vocab slice (`loss_parallel()`), never gathering the full logits.
The model's attention uses `view(batch, seq, -1, head_dim)`, so RoPE and GQA work on local heads.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)


def apply_tensor_parallel(model: nn.Module, tp_mesh, loss_parallel_enabled: bool) -> None:
    """Shard a Llama-style decoder (or a pipeline stage of one) over `tp_mesh` in place."""
    outer_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1),
                                  output_layouts=Shard(-1) if loss_parallel_enabled else Replicate(),
                                  use_local_output=not loss_parallel_enabled),
    }
    # A pipeline stage sets the modules it does not own to None.
    outer_plan = {name: style for name, style in outer_plan.items() if getattr(model, name, None) is not None}
    parallelize_module(model, tp_mesh, outer_plan)
    if getattr(model, "tok_embeddings", None) is not None:
        model.tok_embeddings.register_forward_hook(_wait_async_output)

    for block in model.layers.values():
        block_plan = {
            "attention_norm": SequenceParallel(),
            # (x, rope, mask): x is gathered over the sequence; the RoPE table and the block-causal mask
            # (or None) are ordinary tensors, whole on every rank.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        }
        parallelize_module(block, tp_mesh, block_plan)


class _WaitAsyncCollective(torch.autograd.Function):
    """Identity that completes a pending functional collective (AsyncCollectiveTensor -> Tensor)."""

    @staticmethod
    def forward(ctx, x):
        return x.trigger_wait() if isinstance(x, AsyncCollectiveTensor) else x

    @staticmethod
    def backward(ctx, grad):
        return grad


def _wait_async_output(module, inputs, output):
    """The embedding's reduce-scatter result reaches the first (compiled) block as a plain tensor.

    RowwiseParallel hands back the pending collective (an AsyncCollectiveTensor). Fed into a compiled
    block, AOTAutograd traces it as a tensor subclass input, and the eager backward then gets a plain
    gradient where it expects a DTensor (a crash in torch 2.13; pytorch#179506). Waiting here costs
    nothing: the block's first op would wait anyway.
    """
    return _WaitAsyncCollective.apply(output) if isinstance(output, AsyncCollectiveTensor) else output


def enable_async_tensor_parallel(tp_mesh) -> None:
    """Let Inductor overlap TP collectives with the matmuls (micro-pipelining over symmetric
    memory). CUDA + torch.compile only; `ParallelDims.validate_features` checks that at start-up."""
    import torch._inductor.config as inductor_config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    inductor_config._micro_pipeline_tp = True
    enable_symm_mem_for_group(tp_mesh.get_group().group_name)


def loss_parallel_context(enabled: bool):
    """Context for loss and backward: cross-entropy on vocab-sharded logits when enabled."""
    return loss_parallel() if enabled else contextlib.nullcontext()
