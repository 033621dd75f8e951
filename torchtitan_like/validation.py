"""Periodic validation: mean loss (and so perplexity) over held-out batches."""

from __future__ import annotations

import itertools

import torch

from torchtitan_like.distributed.tensors import full_tensor
from torchtitan_like.parallelisms.pipeline import pipeline_evaluate
from torchtitan_like.parallelisms.tensor_parallel import loss_parallel_context


@torch.no_grad()
def evaluate(trainer) -> float:
    """Mean loss over the first `validation.steps` batches of the split (-1: the whole split), averaged
    over DP ranks. Every evaluation scores the same batches, so the curve shows the model's progress,
    not a change of data."""
    # Validation is not training: its time stays out of the next log line's tokens/s and MFU.
    with trainer.metrics.untimed():
        return _mean_loss(trainer)


def _mean_loss(trainer) -> float:
    steps = trainer.config.validation.steps
    for part in trainer.model_parts:
        part.eval()
    total, count = torch.zeros((), device=trainer.device), 0
    trainer.val_dataloader.sampler.restart()
    batches = iter(trainer.val_dataloader)
    try:
        for inputs, labels in (batches if steps == -1 else itertools.islice(batches, steps)):
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
