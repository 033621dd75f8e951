"""AdamW (decoupled weight decay) or Adam (L2 weight decay), built over one or more model parts
(pipeline stages)."""

from __future__ import annotations

import torch
from torch import nn


def _param_groups(model_parts: list[nn.Module], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and other 1-D parameters are not decayed
    (as in GPT-3 / Llama training)."""
    decay, no_decay, seen = [], [], set()
    for part in model_parts:
        for param in part.parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model_parts: list[nn.Module], optimizer_config, device_type: str) -> torch.optim.Optimizer:
    """One optimizer over all parameters of `model_parts`.

    `implementation = "auto"` chooses the fused CUDA kernel on GPUs and the foreach (multi-tensor)
    path elsewhere.
    """
    implementation = optimizer_config.implementation
    if implementation == "auto":
        implementation = "fused" if device_type == "cuda" else "foreach"
    kwargs = dict(lr=optimizer_config.lr, betas=(optimizer_config.beta1, optimizer_config.beta2),
                  eps=optimizer_config.eps, fused=implementation == "fused",
                  foreach=implementation == "foreach")
    groups = _param_groups(model_parts, optimizer_config.weight_decay)
    if optimizer_config.name == "AdamW":
        return torch.optim.AdamW(groups, **kwargs)
    # Adam's weight decay is L2: added to the gradient before the moments (as TorchTitan passes it).
    return torch.optim.Adam(groups, **kwargs)
