"""FSDP2 (`fully_shard`): parameters sharded over the data-parallel ranks, gathered per unit.

Each unit (a transformer block; the embedding; the final norm with the output projection) is one
all-gather in forward and one reduce-scatter in backward, so peak memory holds one unit's full
parameters at a time and the collectives overlap the neighbouring unit's compute. The root
`fully_shard(model)` takes whatever remains (e.g. nothing, or buffers).

HSDP (`dp_replicate` > 1): the mesh is 2-D (replicate, shard); parameters are sharded within a
replica group and gradients are all-reduced across groups: less communication over the slow
inter-node links than FSDP across all ranks, more memory than full sharding.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard


def reshard_after_forward_policy(policy: str, pp_enabled: bool) -> bool:
    """`default` frees gathered parameters after forward unless pipelining: with PP, every
    microbatch's backward would all-gather again, so the parameters are kept until the step ends."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    return not pp_enabled


def apply_fsdp(model: nn.Module, units: list, dp_mesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype,
               reshard_after_forward: bool, cpu_offload: bool, last_unit_reshard: bool | None = None) -> None:
    """Shard each of `units` (a module or a list of modules grouped into one unit) and then the root.

    The last unit (norm + output) is not resharded after forward by default: backward starts with it
    right away, so freeing it would only force an immediate all-gather.
    """
    sharding = {"mesh": dp_mesh}
    if cpu_offload:
        sharding["offload_policy"] = CPUOffloadPolicy()
    # Only the root casts its floating-point inputs (a pipeline stage's received activations) to
    # param_dtype. Inside, the activations are in param_dtype already (each unit computes with its
    # gathered low-precision parameters), and the only other floating-point input of a unit is the
    # RoPE cos/sin table handed to every block: cast to bf16, it would rotate q and k by rounded
    # angles under FSDP only (one GPU keeps fp32 under autocast; TorchTitan's complex freqs_cis is
    # never cast, as FSDP casts only real floating-point tensors).
    unit_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root_policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for index, unit in enumerate(units):
        is_last = index == len(units) - 1
        reshard = reshard_after_forward if not is_last or last_unit_reshard is None else last_unit_reshard
        fully_shard(unit, reshard_after_forward=reshard, mp_policy=unit_policy, **sharding)
    fully_shard(model, reshard_after_forward=reshard_after_forward, mp_policy=root_policy, **sharding)
