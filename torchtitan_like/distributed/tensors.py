"""Helpers that let code written for plain tensors also handle DTensor-sharded ones."""

from __future__ import annotations

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "placements")


def assign_full_value(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the global value `full` into `param`, keeping only this rank's slice when sharded.

    Every rank computes the same `full` (same seed), so the slice is cut locally without any
    communication (`src_data_rank=None`).
    """
    if is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        full = full.to(device=param.device, dtype=param.dtype)
        param.copy_(distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None))
    else:
        param.copy_(full.to(device=param.device, dtype=param.dtype))


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The gathered global value of a DTensor (collective), or the tensor itself."""
    return tensor.full_tensor() if is_dtensor(tensor) else tensor
