"""Training loss: token-mean cross-entropy computed in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over all (batch, seq) positions; logits upcast to fp32 so the
    softmax of a bf16 model is numerically stable."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))
