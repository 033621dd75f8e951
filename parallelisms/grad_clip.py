"""Gradient clipping by the global norm across every mesh dimension.

With FSDP/TP the gradients are DTensors: torch's norm reduces over their meshes. With pipeline
parallel each rank holds only its stages' parameters, so the squared norms are summed over the
`pp` dim as well before the clip coefficient is computed (TorchTitan's approach).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from torchtitan_like.distributed.tensors import is_dtensor


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, parallel_dims, mesh, norm_type: float = 2.0) -> torch.Tensor:
    """Clip in place when max_norm > 0 and return the total gradient norm (a plain tensor)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    total_norm = torch.nn.utils.get_total_norm(grads, norm_type=norm_type, foreach=True)
    if is_dtensor(total_norm):
        total_norm = total_norm.full_tensor()
    if parallel_dims is not None and parallel_dims.pp_enabled:
        if math.isinf(norm_type):
            dist.all_reduce(total_norm, op=dist.ReduceOp.MAX, group=mesh["pp"].get_group())
        else:
            total_norm = total_norm ** norm_type
            dist.all_reduce(total_norm, op=dist.ReduceOp.SUM, group=mesh["pp"].get_group())
            total_norm = total_norm ** (1.0 / norm_type)
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(grads, max_norm, total_norm, foreach=True)
    return total_norm
