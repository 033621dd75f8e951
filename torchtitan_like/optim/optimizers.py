"""AdamW (decoupled weight decay) or Adam (L2 weight decay), built over one or more model parts
(pipeline stages)."""

from __future__ import annotations

import math

import torch
from torch import nn

from torchtitan_like import master_weights


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

    `implementation = "auto"` chooses the Triton kernel on GPUs (torch's fused one where Triton is
    missing) and the foreach (multi-tensor) path elsewhere. "triton" builds `TritonAdamW` /
    `TritonAdam` (kernels/adamw.py): 28 bytes of memory traffic per fp32 parameter where torch's
    fused kernel moves 32 with the clip, 18.6 against 29.0 ms per step for 2.8 G parameters on an
    H200 (docs/benchmarks.md). Its kernel does not write the clipped gradient back; on CPU without
    the Triton interpreter it runs torch's for-loop step.
    """
    offloaded = device_type == "cuda" and any(
        param.device.type == "cpu" for part in model_parts for param in part.parameters())
    implementation = resolve_implementation(optimizer_config.implementation, device_type, offloaded)
    if any(master_weights.is_split(param) for part in model_parts for param in part.parameters()):
        # Only the Triton step updates both halves of a split master weight (on CPU without the
        # interpreter, through its plain-torch fallback); validate.py refuses the other choices.
        implementation = "triton"
    kwargs = dict(lr=optimizer_config.lr, betas=(optimizer_config.beta1, optimizer_config.beta2),
                  eps=optimizer_config.eps)
    groups = _param_groups(model_parts, optimizer_config.weight_decay)
    if implementation == "triton":
        from torchtitan_like.kernels.adamw import TritonAdam, TritonAdamW

        return (TritonAdamW if optimizer_config.name == "AdamW" else TritonAdam)(groups, **kwargs)
    kwargs.update(fused=implementation == "fused", foreach=implementation == "foreach")
    if optimizer_config.name == "AdamW":
        return torch.optim.AdamW(groups, **kwargs)
    # Adam's weight decay is L2: added to the gradient before the moments (as TorchTitan passes it).
    return torch.optim.Adam(groups, **kwargs)


def resolve_implementation(implementation: str, device_type: str, offloaded: bool = False) -> str:
    """`optimizer.implementation` with "auto" resolved for the device type; `offloaded`: the
    parameters live on the CPU of a CUDA run (FSDP CPU offload), where torch's fused CPU kernel
    is the fast one (the Triton step would fall back to torch's for-loop there)."""
    if implementation != "auto":
        return implementation
    if device_type != "cuda":
        return "foreach"
    if offloaded:
        return "fused"
    from torchtitan_like.kernels import adamw

    return "triton" if adamw.triton is not None else "fused"


def reapply_optimizer_config(optimizer: torch.optim.Optimizer, lr_scheduler: torch.optim.lr_scheduler.LambdaLR,
                             optimizer_config) -> list[str]:
    """After a resume, make the config's optimizer settings win over the checkpoint's.

    Loading restores every param group's options (lr, initial_lr, weight_decay, betas, eps) and the
    scheduler's base_lrs as they were saved, so a changed `optimizer.lr` etc. would be silently
    ignored. The peak LR is re-applied to the schedule and the current LR recomputed for the
    restored step (the schedule's shape already comes from the config); weight decay goes only to
    the decayed group (norms and biases stay at 0). Logs and returns one line per changed value, and
    one when the schedule itself changed (training.steps or [lr_scheduler]: the restored step's LR
    multiplier differs from the one the checkpointed schedule gave it).
    """
    from torchtitan_like.logging import logger

    changes: dict[str, tuple] = {}
    # The multiplier the checkpointed run's schedule gave the next step (its LR over its peak, both
    # restored with the scheduler), to tell a changed schedule apart from a changed peak.
    restored_multiplier = lr_scheduler.get_last_lr()[0] / lr_scheduler.base_lrs[0]

    def apply(group: dict, option: str, name: str, value) -> None:
        current = tuple(group[option]) if isinstance(value, tuple) else group[option]
        if current != value:
            changes.setdefault(name, (current, value))
        group[option] = value

    for index, group in enumerate(optimizer.param_groups):
        # The kernel choice is this run's, not the checkpoint's: loading copies the saved groups'
        # `fused` / `foreach` flags (a run saved with torch's fused AdamW would otherwise resume on
        # another implementation's path, or the reverse). Silent: it changes no numbers that matter.
        for flag in ("fused", "foreach"):
            if flag in optimizer.defaults:
                group[flag] = optimizer.defaults[flag]
        # Loading also restores `decoupled_weight_decay`, which is what makes torch's Adam an AdamW:
        # a run resumed with optimizer.name changed would otherwise keep the checkpoint's decay.
        if "decoupled_weight_decay" in optimizer.defaults:
            apply(group, "decoupled_weight_decay", "decoupled_weight_decay (AdamW)",
                  optimizer.defaults["decoupled_weight_decay"])
        decayed = any(param.ndim >= 2 for param in group["params"])
        apply(group, "weight_decay", "weight_decay", optimizer_config.weight_decay if decayed else 0.0)
        apply(group, "betas", "beta1, beta2", (optimizer_config.beta1, optimizer_config.beta2))
        apply(group, "eps", "eps", optimizer_config.eps)
        if lr_scheduler.base_lrs[index] != optimizer_config.lr:
            changes.setdefault("lr", (lr_scheduler.base_lrs[index], optimizer_config.lr))
        lr_scheduler.base_lrs[index] = optimizer_config.lr
        apply(group, "initial_lr", "lr", optimizer_config.lr)
        # LambdaLR: after k scheduler steps (last_epoch = k) the group's lr is peak x lambda(k).
        group["lr"] = optimizer_config.lr * lr_scheduler.lr_lambdas[index](lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    lines = [f"optimizer.{name} changed on resume: {_show(old)} -> {_show(new)}" for name, (old, new) in changes.items()]
    multiplier = lr_scheduler.lr_lambdas[0](lr_scheduler.last_epoch)
    if not math.isclose(restored_multiplier, multiplier, rel_tol=1e-9, abs_tol=1e-12):
        # training.steps or [lr_scheduler] changed: the schedule is this config's, the step the checkpoint's
        step = lr_scheduler.last_epoch + 1
        lines.append(f"LR schedule changed on resume (training.steps or [lr_scheduler]): step {step} uses "
                     f"{multiplier:g} x peak = {optimizer_config.lr * multiplier:g}, where the checkpointed run's "
                     f"schedule gave {restored_multiplier:g} x peak")
    for line in lines:
        logger.info(line)
    return lines


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ", ".join(f"{item:g}" for item in value) if isinstance(value, tuple) else f"{value:g}"
