"""Activation checkpointing: trade recomputation in backward for activation memory.

Modes (config `activation_checkpoint`):
- `full`: every transformer block keeps only its input; backward re-runs the whole block forward.
  Lowest memory, about one extra forward (~33% more compute).
- `selective` with an integer k: full checkpointing of every k-th block only (k = 1 is `full`).
- `selective` with `op`: per-operator policy inside every block (Korthikanti et al. 2022, as in
  TorchTitan): outputs of the expensive ops in `SAVED_OPS` (matmuls and attention) are kept,
  everything cheap and memory-heavy (norms, SwiGLU pointwise, RoPE, softmax intermediates inside
  the attention kernel's inputs) is recomputed. Most of the memory saving at a few % compute.

Blocks are wrapped with `checkpoint_wrapper` (non-reentrant `torch.utils.checkpoint`). That inserts
`_checkpoint_wrapped_module.` into parameter names; the wrapper's state-dict hooks strip it from
checkpoints, and `Transformer.init_weights` strips it before seeding, so the weights match an
unwrapped model's exactly.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

import torchtitan_like.kernels.float8.gemm  # noqa: F401  registers torchtitan_like::fp8_scaled_mm


def _saved_ops() -> set:
    """Ops whose outputs per-op selective AC keeps: matmuls (plain, batched, fused bias, FP8 scaled
    by torch or by our Triton kernel), every fused attention kernel available in this torch build,
    the amax reductions of Float8 scaling and, under tensor parallel, their all-reduce (a scalar or
    a column: no memory, and no second pass or collective in backward), and the reduce-scatter that
    ends a tensor-parallel block's attention and FFN under sequence parallel (recomputing it would
    put the collective on backward's critical path again; its output is a 1/tp sequence slice). The
    sequence-parallel all-gathers are recomputed: keeping their full-sequence outputs would cost as
    much memory as no checkpointing of them."""
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "amax")
    ops = {getattr(aten, name).default for name in names if hasattr(aten, name)}
    # our Triton fp8 GEMM (kernels/float8/gemm.py registers it when imported)
    ops.add(torch.ops.torchtitan_like.fp8_scaled_mm.default)
    functional_collectives = getattr(torch.ops, "_c10d_functional", None)
    for name in ("reduce_scatter_tensor", "all_reduce"):  # all_reduce in a block: the TP Float8 amaxes
        if functional_collectives is not None and hasattr(functional_collectives, name):
            ops.add(getattr(functional_collectives, name).default)
    return ops


SAVED_OPS = _saved_ops()


def _save_matmuls_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _wrap(block: nn.Module, per_op: bool) -> nn.Module:
    if per_op:
        return checkpoint_wrapper(block, context_fn=partial(create_selective_checkpoint_contexts, _save_matmuls_policy),
                                  preserve_rng_state=False)
    return checkpoint_wrapper(block, preserve_rng_state=False)


def apply_activation_checkpointing(blocks: nn.ModuleDict, mode: str, selective_option: str) -> None:
    """Wrap the blocks of `blocks` in place according to `mode` (none/full/selective)."""
    if mode == "none":
        return
    per_op = mode == "selective" and selective_option == "op"
    every_kth = int(selective_option) if mode == "selective" and not per_op else 1
    for name, block in list(blocks.items()):
        # Layer ids are global (a pipeline stage keeps the original keys), so "every k-th" is
        # the same set of layers whatever the split.
        if (int(name) + 1) % every_kth == 0:
            blocks[name] = _wrap(block, per_op)
