"""Learning-rate schedules: linear warmup, then cosine / linear / sqrt decay, constant, or
warmup-stable-decay (WSD, Hu et al. 2024 "MiniCPM"), with a minimum-LR ratio.

`lr_multiplier(step)` returns the factor applied to the peak LR at optimizer step `step` (1-based:
the LR used by the step-th update). With `decay_ratio = -1` decay runs from the end of warmup to
the last step; with `0 <= decay_ratio <= 1` the LR stays at the peak and decays only over the last
`decay_ratio * steps` steps (WSD).
"""

from __future__ import annotations

import functools
import math

import torch


def lr_multiplier(step: int, *, total_steps: int, warmup_steps: int, decay_type: str, decay_ratio: float,
                  min_lr_factor: float) -> float:
    if warmup_steps > 0 and step <= warmup_steps:
        # A straight line through 1/warmup (not 0: the first update is not wasted) to the peak at
        # step `warmup_steps`, with equal increments all the way.
        return step / warmup_steps
    if decay_type == "constant":
        return 1.0
    decay_steps = total_steps - warmup_steps if decay_ratio < 0 else round(total_steps * decay_ratio)
    decay_start = total_steps - decay_steps
    if decay_steps <= 0 or step <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    if decay_type == "linear":
        shape = 1.0 - progress
    elif decay_type == "sqrt":
        shape = 1.0 - math.sqrt(progress)
    else:  # cosine
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_factor + (1.0 - min_lr_factor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, lr_config, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose `last_epoch` counts optimizer steps (checkpointable with the optimizer)."""
    multiplier = functools.partial(
        lr_multiplier, total_steps=total_steps, warmup_steps=lr_config.warmup_steps,
        decay_type=lr_config.decay_type, decay_ratio=lr_config.decay_ratio, min_lr_factor=lr_config.min_lr_factor)
    # LambdaLR calls the lambda with 0 at construction and with k after k scheduler steps; the
    # (k+1)-th update uses multiplier(k+1).
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: multiplier(count + 1))
