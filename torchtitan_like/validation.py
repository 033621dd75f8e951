"""Periodic validation: mean loss (and so perplexity) over held-out batches."""

from __future__ import annotations

import torch

from torchtitan_like.distributed.tensors import full_tensor
from torchtitan_like.parallelisms.pipeline import pipeline_evaluate
from torchtitan_like.parallelisms.tensor_parallel import loss_parallel_context


@torch.no_grad()
def evaluate(trainer) -> float:
    """Mean loss over `validation.steps` batches (-1: the whole split), averaged over DP ranks."""
    steps = trainer.config.validation.steps
    for part in trainer.model_parts:
        part.eval()
    total, count = torch.zeros((), device=trainer.device), 0
    try:
        for index, (inputs, labels) in enumerate(trainer.val_dataloader):
            if steps != -1 and index >= steps:
                break
            inputs, labels = inputs.to(trainer.device), labels.to(trainer.device)
            with trainer._compute_context(), loss_parallel_context(trainer.loss_parallel):
                if trainer.pipeline is not None:
                    total += pipeline_evaluate(trainer.pipeline, inputs, labels)
                else:
                    total += full_tensor(trainer.loss_fn(trainer.model_parts[0](inputs), labels))
            count += 1
    finally:
        for part in trainer.model_parts:
            part.train()
    return trainer.reduce_loss(total / max(count, 1))
