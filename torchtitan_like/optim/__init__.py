"""Optimizers and learning-rate schedules."""

from torchtitan_like.optim.lr_schedulers import build_lr_scheduler, lr_multiplier
from torchtitan_like.optim.optimizers import build_optimizer, reapply_optimizer_config

__all__ = ["build_optimizer", "build_lr_scheduler", "lr_multiplier", "reapply_optimizer_config"]
