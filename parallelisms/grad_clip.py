"""Gradient clipping by the global norm across every mesh dimension.

With FSDP/TP the gradients are DTensors: torch's norm reduces over their meshes. With pipeline
parallel each rank holds only its stages' parameters, so the squared norms are summed over the
`pp` dim as well before the clip coefficient is computed (TorchTitan's approach).

The clip multiplies every gradient by min(1, max_norm / (norm + 1e-6)), torch's coefficient. With a
fused Adam/AdamW that multiplication moves into the optimizer's kernel: it divides each gradient by
`optimizer.grad_scale` as it reads it (the hook AMP's GradScaler uses). torch's fused kernel stores
the divided gradient back, so the gradients end the step clipped, and the separate pass over them (a
read and a write of each) becomes one extra write inside the optimizer's kernel: 32 instead of 36
bytes of memory traffic per fp32 parameter and step. The Triton optimizers (kernels/adamw.py) do not
write it back, 28 bytes: after their step the gradients are the unclipped ones (nothing in the
trainer reads them after the step; the norm is computed, and returned, before).

Split master weights (`training.master_weights = "split"`) have bf16 gradients, or fp32 `main_grad`
accumulations with gradient accumulation (master_weights.py); the norm of bf16 gradients is taken in
fp32, tensor by tensor (torch's foreach norm would return, and round it to, bf16).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from torchtitan_like.distributed.tensors import is_dtensor
from torchtitan_like.master_weights import gradient_of


def fuses_gradient_clipping(optimizer) -> bool:
    """Whether `optimizer.step()` can apply the clip itself: torch's fused Adam/AdamW kernels and the
    Triton optimizers (which honour `grad_scale` on every device, their CPU fallback included)."""
    from torchtitan_like.kernels.adamw import TritonAdam, TritonAdamW

    if isinstance(optimizer, (TritonAdam, TritonAdamW)):
        return True
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) and bool(optimizer.defaults.get("fused"))


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float, parallel_dims, mesh, norm_type: float = 2.0,
                   optimizer=None) -> torch.Tensor:
    """Clip when max_norm > 0 and return the total gradient norm before clipping (a plain tensor).
    With a fused Adam/AdamW or Triton `optimizer`, its next step applies the clip; otherwise it happens here."""
    parameters = [p for p in parameters if gradient_of(p) is not None]
    grads = [gradient_of(p) for p in parameters]
    if not grads:
        # Nothing to clip on this rank, but a pipeline stage without gradients must still join the
        # norm's all-reduce over pp below, or the other stages wait in it forever.
        total_norm = torch.zeros((), device=mesh.device_type if mesh is not None else "cpu")
    elif any(grad.dtype != torch.float32 and not is_dtensor(grad) for grad in grads):
        total_norm = _fp32_total_norm(grads, norm_type)
    else:
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
    if not grads:
        return total_norm
    if optimizer is not None and fuses_gradient_clipping(optimizer):
        if max_norm > 0:
            # 1 / torch's clip coefficient, as the fp32 tensor the kernel reads on the gradients' device
            optimizer.grad_scale = torch.clamp((total_norm + 1e-6) / max_norm, min=1.0).float().to(grads[0].device)
        elif hasattr(optimizer, "grad_scale"):
            del optimizer.grad_scale
    elif max_norm > 0:
        # torch's coefficient, applied to the local tensors: scaling a DTensor's local shard,
        # replica or partial sum scales its full value alike. Not torch's clip_grads_with_norm_:
        # torch 2.11's foreach multiply leaves Partial DTensors unscaled (the gradients of
        # sequence-parallel norm weights under TP), and it skips split master weights' fp32
        # accumulations (`main_grad`).
        coefficient = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        local = [grad.to_local() if is_dtensor(grad) else grad for grad in grads]
        for device, group in _by_device(local).items():
            torch._foreach_mul_(group, coefficient.to(device))
    return total_norm


def _by_device(tensors: list[torch.Tensor]) -> dict:
    groups: dict = {}
    for tensor in tensors:
        groups.setdefault(tensor.device, []).append(tensor)
    return groups


def _fp32_total_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    """The total norm of plain low-precision gradients (split master weights' bf16 ones), each
    tensor's norm accumulated and returned in fp32 (torch's foreach norm returns the input dtype)."""
    norms = []
    for device, group in _by_device(grads).items():
        norms.extend(torch._foreach_norm(group, norm_type, dtype=torch.float32))
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([norm.to(device) for norm in norms]), norm_type)
