"""Swap a model's nn.Linear layers for Float8Linear from the [float8] config, and check the device.

A layer is kept in high precision when its fqn contains a `filter_fqns` entry (default ["output"]:
the LM head is sensitive and its vocab width is often not a multiple of 16) or when in_features or
out_features is not a multiple of 16 (fp8 tensor-core GEMMs and `torch._scaled_mm` need it).
The swap reuses the same Parameter objects, so fqns, checkpoints, the optimizer's parameter list
and a later `fully_shard` (FSDP2) see exactly the model they would without float8. Apply it before
tensor parallelism: ColwiseParallel / RowwiseParallel then shard the Float8Linear weights, which
run their fp8 GEMMs on the local shards with TP-reduced scales (see linear.py).

`enable_fsdp_float8_all_gather` wraps each swapped weight in fsdp.Float8AllGatherWeight (a new
Parameter around the same storage), so that a later `fully_shard` all-gathers it in fp8 (tensorwise
only); the layer's state dict holds the plain weight, so checkpoints do not change. It is rejected
with tensor parallel (ConfigError at start-up). Without FSDP (data-parallel degree 1) it is a no-op:
the wrapper behaves like the plain weight and Float8Linear casts it as usual (config/validate.py
logs an info line when the config sets both data-parallel degrees to 1).
`precompute_float8_dynamic_scale_for_fsdp` needs the all-gather flag.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from torchtitan_like.errors import ConfigError
from torchtitan_like.kernels.float8.fsdp import Float8AllGatherWeight, unwrap_weight_in_state_dict
from torchtitan_like.kernels.float8.linear import Float8Linear
from torchtitan_like.logging import logger

MIN_CAPABILITY = (8, 9)  # Ada (sm89) and Hopper (sm90) have fp8 tensor cores


def check_float8_support(device: torch.device | str, float8_config) -> None:
    """Raise ConfigError when float8 is enabled on a device without fp8 GEMMs and emulate is off.

    Allowed: emulate = true anywhere; CUDA with compute capability >= 8.9; CPU under the Triton
    interpreter (TRITON_INTERPRET=1) with backend = "triton" (kernel tests).
    """
    if not float8_config.enable or float8_config.emulate:
        return
    device = torch.device(device)
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise ConfigError(
                f"float8.enable = true needs a GPU with compute capability >= 8.9 (H100/H200, L4, RTX 40xx); "
                f"this GPU is sm{capability[0]}{capability[1]}. Set float8.emulate = true to emulate fp8 "
                f"in high precision, or float8.enable = false.")
        if float8_config.backend == "torch" and not hasattr(torch, "_scaled_mm"):
            raise ConfigError('float8.backend = "torch" needs torch._scaled_mm; use backend = "triton" or "auto".')
        return
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and float8_config.backend == "triton":
        return
    raise ConfigError(
        f"float8.enable = true needs a CUDA GPU with compute capability >= 8.9, but the device is "
        f"{device.type}. Set float8.emulate = true to emulate fp8 in high precision (e.g. CPU tests), "
        f"or float8.enable = false.")


def validate_float8_config(float8_config, parallelism=None) -> None:
    """Raise ConfigError for [float8] combinations that cannot run (config/validate.py calls this at
    start-up with the [parallelism] section; convert_to_float8 again without it)."""
    if float8_config.recipe_name not in ("tensorwise", "rowwise"):
        raise ConfigError(f'float8.recipe_name = "{float8_config.recipe_name}" is not one of "tensorwise", "rowwise".')
    all_gather = float8_config.enable_fsdp_float8_all_gather
    if all_gather and float8_config.recipe_name != "tensorwise":
        raise ConfigError("float8.enable_fsdp_float8_all_gather = true works only with recipe_name = \"tensorwise\".")
    if float8_config.save_fp8_weight == "always" and float8_config.recipe_name != "tensorwise":
        raise ConfigError('float8.save_fp8_weight = "always" works only with recipe_name = "tensorwise" (the rowwise '
                          'backward casts the weight per column, with other scales than the forward); use "auto".')
    if float8_config.precompute_float8_dynamic_scale_for_fsdp and not all_gather:
        raise ConfigError("float8.precompute_float8_dynamic_scale_for_fsdp = true needs "
                          "float8.enable_fsdp_float8_all_gather = true (the scales are those of the fp8 all-gather).")
    if all_gather and parallelism is not None and parallelism.tensor_parallel_degree > 1:
        raise ConfigError(f"float8.enable_fsdp_float8_all_gather = true is not supported with "
                          f"parallelism.tensor_parallel_degree = {parallelism.tensor_parallel_degree}; set "
                          f"float8.enable_fsdp_float8_all_gather = false (FSDP then gathers weights in their "
                          f"param dtype) or tensor_parallel_degree = 1.")


def convert_to_float8(model: nn.Module, float8_config, weights_sharded: bool = False) -> int:
    """Replace eligible nn.Linear modules of `model` in place by Float8Linear; returns how many.

    weights_sharded: FSDP will shard the weights (data_parallel_shard_degree > 1); then
    `save_fp8_weight = "auto"` does not keep fp8 weights for backward, since FSDP frees each gathered
    weight after forward and the fp8 copies would hold the unsharded size of every layer instead.
    Does nothing (returns 0) when float8_config.enable is false.
    """
    if not float8_config.enable:
        return 0
    validate_float8_config(float8_config)
    save_fp8_weight = float8_config.recipe_name == "tensorwise" and (
        float8_config.save_fp8_weight == "always" or (float8_config.save_fp8_weight == "auto" and not weights_sharded))
    filters = list(float8_config.filter_fqns or [])
    targets, skipped = [], []
    for fqn, module in model.named_modules():
        if type(module) is not nn.Linear:  # exact type: never re-wrap a Float8Linear or a subclass
            continue
        if any(pattern in fqn for pattern in filters):
            skipped.append(f"{fqn} (filter_fqns)")
        elif module.in_features % 16 or module.out_features % 16:
            skipped.append(f"{fqn} ({module.in_features}x{module.out_features} not divisible by 16)")
        else:
            targets.append(fqn)
    for fqn in targets:
        parent_name, _, child_name = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = Float8Linear.from_linear(getattr(parent, child_name), recipe=float8_config.recipe_name,
                                         backend=float8_config.backend, emulate=float8_config.emulate,
                                         save_fp8_weight=save_fp8_weight)
        if float8_config.enable_fsdp_float8_all_gather:
            enable_float8_all_gather(layer)
        setattr(parent, child_name, layer)
    if skipped:
        logger.info(f"float8: kept {len(skipped)} linear layer(s) in high precision: {', '.join(skipped)}")
    logger.info(f"float8: swapped {len(targets)} nn.Linear -> Float8Linear "
                f"(recipe={float8_config.recipe_name}, backend={float8_config.backend}, emulate={float8_config.emulate}, "
                f"fsdp_float8_all_gather={float8_config.enable_fsdp_float8_all_gather}, save_fp8_weight={save_fp8_weight})")
    return len(targets)


def enable_float8_all_gather(layer: Float8Linear) -> None:
    """Wrap the layer's weight so that FSDP2 all-gathers it in fp8 (fsdp.py); a new Parameter object,
    so call it before the optimizer is built (the trainer converts on the meta device)."""
    if layer.recipe != "tensorwise":
        raise ConfigError("float8.enable_fsdp_float8_all_gather = true works only with recipe_name = \"tensorwise\".")
    weight = layer.weight
    if not isinstance(weight, Float8AllGatherWeight):
        layer.weight = nn.Parameter(Float8AllGatherWeight(weight.detach()), requires_grad=weight.requires_grad)
        layer.register_state_dict_post_hook(unwrap_weight_in_state_dict)
