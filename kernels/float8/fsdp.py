"""FSDP2 all-gather of Float8Linear weights in float8 (tensorwise recipe), with precomputed scales.

Without this, FSDP2 all-gathers each weight in its param dtype and Float8Linear casts the full weight
to e4m3 in forward. Here the cast moves before the all-gather, so the collective carries 1 byte per
element instead of 2 (bf16) or 4 (fp32), and the gathered weight is already the fp8 GEMM operand:

    amax  = max |W| over the FULL weight = all_reduce(MAX, max |W_shard|) over the FSDP shard group
    scale = FP8_MAX(e4m3) / max(amax, EPS)                            (fp32, quantize.py)
    W_shard_fp8 = cast_rne(clamp(W_shard * scale))                    (quantize.py's rounding)
    all_gather(W_shard_fp8 as uint8) -> W_fp8 (N, K); scale travels as metadata

Every element is cast with the scale of the full weight, from the shard in FSDP's mixed-precision
param dtype (bf16 on GPUs), so W_fp8 holds exactly the bits that Float8Linear would produce by
casting the gathered weight: losses and gradients do not change. The bytes travel as uint8 (gloo has no float8 collectives; NCCL moves the same bytes).

Two tensor subclasses implement FSDP2's all-gather extension (torch/distributed/fsdp/_fully_shard/
_fsdp_param.py):

- `Float8AllGatherWeight`: the sharded high-precision weight, i.e. what FSDP2 keeps as each rank's
  local shard inside the sharded DTensor parameter. It behaves like its inner tensor: every op is run
  on the inner tensor; the ops that must keep the subclass (those FSDP2 sharding, `to_empty`, `detach`
  and `.to()` run on the parameter: `_KEEPS_WRAPPER`) re-wrap their outputs, and in-place ops
  (init's `copy_`, optimizer updates) return the wrapper itself. It defines `fsdp_pre_all_gather`
  (the 5-argument form of torch >= 2.11) and `fsdp_post_all_gather`.
- `Float8GatheredWeight`: the unsharded parameter FSDP2 registers on the module for forward and
  backward. It looks like an (N, K) tensor of the param dtype and holds the gathered fp8 data and the
  fp32 scale; Float8Linear (linear.py) uses them directly as GEMM operands, and dgrad uses the
  transposed fp8 data with the same scale. View ops FSDP2 applies (`as_strided`, `detach`, `view`)
  keep the subclass; other non-mutating ops see the dequantized weight; in-place ops are refused.

`precompute_float8_scales(modules)` runs after the optimizer step: one batched amax of every local
shard, ONE all-reduce(MAX) per shard group for all weights, and the scales are stored on the wrappers,
so the next all-gathers skip their per-weight all-reduce. A precomputed scale is used only until an
in-place op next touches the shard, so a later update (optimizer step, checkpoint load) falls back to
a freshly reduced amax instead of a stale scale.

Scope (checked in config/validate.py and convert.py): tensorwise recipe only; not with tensor
parallel (TP weights are DTensors that FSDP2 shards as DTensors; not supported). Without FSDP
(data-parallel degree 1) the wrapper is transparent and Float8Linear casts as it would without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map_only

from torchtitan_like.kernels.float8 import quantize as q

aten = torch.ops.aten

# Ops FSDP2 (sharding, padding, to_empty, cpu offload), nn.Parameter and state dicts run on the
# sharded weight whose outputs must stay wrappers, or the all-gather extension would be lost.
_KEEPS_WRAPPER = {
    aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
    aten.as_strided.default, aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default,
    aten.new_zeros.default, aten.new_empty.default, aten.new_empty_strided.default, aten.empty_like.default,
    aten.clone.default, aten._to_copy.default, aten._pin_memory.default,
}
# Copies with the very same values as their input: a precomputed scale carries over to them.
_SAME_VALUES = {aten.clone.default, aten._to_copy.default, aten._pin_memory.default}
# View ops FSDP2 and nn.Parameter apply to the unsharded weight; they act on the fp8 data alike.
_GATHERED_VIEWS = {aten.detach.default, aten.alias.default, aten.view.default, aten._unsafe_view.default,
                   aten.as_strided.default}


class Float8AllGatherWeight(torch.Tensor):
    """A high-precision weight (shard) that FSDP2 all-gathers in float8; otherwise its inner tensor."""

    _data: torch.Tensor
    _precomputed_scale: torch.Tensor | None

    @staticmethod
    def __new__(cls, data: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=data.dtype,
            device=data.device, layout=data.layout, requires_grad=data.requires_grad)

    def __init__(self, data: torch.Tensor):
        self._data = data
        self._precomputed_scale = None

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"Float8AllGatherWeight({self._data!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func._schema.is_mutable:
            # The version counter cannot tell: in-place ops reach here below autograd, which bumps it.
            tree_map_only(cls, cls._forget_precomputed_scale, (args, kwargs))
        inner_args, inner_kwargs = tree_map_only(cls, lambda t: t._data, (args, kwargs or {}))
        out = func(*inner_args, **inner_kwargs)
        if func in _KEEPS_WRAPPER:
            wrapped = tree_map_only(torch.Tensor, cls, out)
            source = args[0] if args and isinstance(args[0], cls) else None
            if func in _SAME_VALUES and source is not None and source._precomputed_scale is not None:
                # FSDP2 with CPU offload all-gathers from `shard.to(device)`: a copy holds the same
                # values, so the precomputed scale still holds for it (else every all-gather would
                # compute its own amax again, silently).
                wrapped._precomputed_scale = source._precomputed_scale.to(wrapped.device, non_blocking=True)
            return wrapped
        if isinstance(out, torch.Tensor) and inner_args and out is inner_args[0]:
            return args[0]  # in-place op: return the wrapper it mutated, as for a plain tensor
        return out

    def __tensor_flatten__(self):
        return ["_data"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, metadata, outer_size, outer_stride):
        return Float8AllGatherWeight(inner_tensors["_data"])

    def set_precomputed_scale(self, scale: torch.Tensor) -> None:
        """Use `scale` for all-gathers until an in-place op next touches the shard."""
        self._precomputed_scale = scale

    def _forget_precomputed_scale(self) -> None:
        self._precomputed_scale = None

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """(fp8 shard as uint8,), (scale,): the all-gather input and the metadata post_all_gather gets.

        The shard is first cast to the mixed-precision param dtype, as FSDP2 would gather it without
        this extension: Float8Linear would then take the amax of, and cast, those bf16 values, and
        the fp8 bits must be the same (casting the fp32 master values directly rounds once where
        the bf16 path rounds twice, and can pick another scale)."""
        data = _in_compute_dtype(self._data, getattr(mp_policy, "param_dtype", None))
        scale = self._precomputed_scale
        if scale is None:
            scale = q.amax_to_scale_reference(_all_reduce_max(_local_amax(data), mesh.get_group()), q.E4M3)
        shard = _pad_rows(data, math.ceil(outer_size[0] / mesh.size()))
        return (cast_to_e4m3(shard, scale, _uses_kernels(module, shard.device)).view(torch.uint8),), (scale,)

    @torch.no_grad()
    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The unsharded Float8GatheredWeight, or refresh `out` (FSDP2 reuses its storage)."""
        (gathered_bytes,) = all_gather_outputs
        (scale,) = metadata
        data = gathered_bytes.view(q.E4M3)
        if out is not None:
            if not isinstance(out, Float8GatheredWeight) or out._data.data_ptr() != data.data_ptr():
                raise AssertionError("FSDP2 passed an unsharded weight that does not hold the all-gather output")
            # The backward re-gather recomputes the forward's scale from unchanged weights, so the value
            # is the same; keeping the version lets a compiled backward use the scale it saved.
            with torch.autograd._unsafe_preserve_version_counter(out._scale):
                out._scale.copy_(scale)
            return None
        return Float8GatheredWeight(data, scale.clone(), param_dtype), (data,)


class Float8GatheredWeight(torch.Tensor):
    """The all-gathered weight: looks like (N, K) of `dtype`, holds fp8 `_data` (N, K) and fp32 `_scale`."""

    _data: torch.Tensor
    _scale: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        return torch.Tensor._make_wrapper_subclass(
            cls, data.size(), strides=data.stride(), storage_offset=data.storage_offset(), dtype=dtype,
            device=data.device, requires_grad=False)

    def __init__(self, data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        self._data = data
        self._scale = scale

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self) -> str:
        return f"Float8GatheredWeight(shape={tuple(self.shape)}, dtype={self.dtype}, scale={self._scale.item()})"

    def dequantize(self) -> torch.Tensor:
        return (self._data.float() / self._scale).to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GATHERED_VIEWS:
            weight = args[0]
            return cls(func(weight._data, *args[1:], **kwargs), weight._scale, weight.dtype)
        if func._schema.is_mutable:
            raise NotImplementedError(f"{func} would modify an all-gathered float8 weight; FSDP2 rebuilds it "
                                      "from the sharded parameter, so modify that instead")
        return func(*tree_map_only(cls, cls.dequantize, args), **tree_map_only(cls, cls.dequantize, kwargs))

    def __tensor_flatten__(self):
        return ["_data", "_scale"], self.dtype

    @staticmethod
    def __tensor_unflatten__(inner_tensors, dtype, outer_size, outer_stride):
        return Float8GatheredWeight(inner_tensors["_data"], inner_tensors["_scale"], dtype)


def unwrap_weight_in_state_dict(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """State-dict post-hook: the weight as a plain tensor (or DTensor of a plain local shard) sharing
    the shard's storage, so checkpoints hold ordinary tensors (our safe loader refuses pickled
    classes) and an in-place load still lands in the parameter."""
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = _unwrapped(state_dict[key])


def _unwrapped(tensor: torch.Tensor) -> torch.Tensor:
    local = getattr(tensor, "_local_tensor", tensor)
    if not isinstance(local, Float8AllGatherWeight):
        return tensor
    if local is tensor:
        return local._data
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local._data, tensor.device_mesh, tensor.placements, run_check=False,
                              shape=tensor.shape, stride=tensor.stride())


def cast_to_e4m3(weight: torch.Tensor, scale: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
    """The weight in e4m3 with `scale`, rounded exactly as Float8Linear's own cast (quantize.py): the
    Triton kernel where it runs (and `use_kernel`), else the bit-equal torch reference."""
    if use_kernel and weight.numel() and q.triton_available(weight.device):
        return q.tensorwise_quantize(weight, q.E4M3, "no", scale=scale)[0]
    return q.to_float8_reference(weight, scale, q.E4M3)


def _uses_kernels(module: nn.Module, device: torch.device) -> bool:
    """Whether the layer casts with the Triton kernels (not emulated), as Float8Linear decides."""
    from torchtitan_like.kernels.float8.gemm import resolve_backend

    return resolve_backend(getattr(module, "backend", "auto"), device, getattr(module, "emulate", False)) != "emulate"


def _local_amax(shard: torch.Tensor) -> torch.Tensor:
    # max(|x|) is exact in any dtype; an empty shard (uneven FSDP split) contributes 0
    if shard.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=shard.device)
    return shard.abs().amax().float()


def _all_reduce_max(amax: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol  # traceable under torch.compile

    return funcol.wait_tensor(funcol.all_reduce(amax, "max", group))


def _pad_rows(shard: torch.Tensor, rows: int) -> torch.Tensor:
    """FSDP2 all-gathers equal-size shards: zero rows (amax-neutral) pad the last rank's short shard."""
    if shard.size(0) == rows:
        return shard
    padded = shard.new_zeros((rows, *shard.shape[1:]))
    padded[: shard.size(0)] = shard
    return padded


def float8_all_gather_shards(modules: Iterable[nn.Module]) -> list[tuple[Float8AllGatherWeight, object]]:
    """(local shard, FSDP shard group) of every float8-all-gathered weight FSDP2 shards in `modules`."""
    shards = []
    for module in modules:
        for param in module.parameters():
            local = getattr(param, "_local_tensor", None)
            if isinstance(local, Float8AllGatherWeight):
                shards.append((local, _shard_group(param)))
    return shards


def _shard_group(param) -> object:
    """The process group of the mesh dim FSDP2 shards `param` over (HSDP replicas hold equal shards)."""
    from torch.distributed.tensor import Shard

    shard_dims = [dim for dim, placement in enumerate(param.placements) if isinstance(placement, Shard)]
    if len(shard_dims) != 1:
        raise NotImplementedError(f"float8 all-gather expects one FSDP shard dim, got {param.placements}")
    return param.device_mesh.get_group(shard_dims[0])


def _batched_amax(tensors: list[torch.Tensor]) -> torch.Tensor:
    """max |t| of each tensor (fp32, exact) in one foreach kernel; an empty shard's is 0."""
    amaxes = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
    nonempty = [index for index, tensor in enumerate(tensors) if tensor.numel()]
    if nonempty:
        norms = torch._foreach_norm([tensors[index] for index in nonempty], ord=math.inf)
        amaxes[nonempty] = torch.stack(norms).float()
    return amaxes


@torch.no_grad()
def _in_compute_dtype(data: torch.Tensor, param_dtype: torch.dtype | None) -> torch.Tensor:
    return data if param_dtype is None or param_dtype == data.dtype else data.to(param_dtype)


def precompute_float8_scales(modules: Iterable[nn.Module], param_dtype: torch.dtype | None = None) -> int:
    """Compute the all-gather scale of every float8-all-gathered weight in `modules` with one amax
    pass and one all-reduce(MAX) per shard group (one with FSDP or HSDP); returns how many.
    `param_dtype`: FSDP's mixed-precision param dtype, whose values the all-gather casts; the amax
    of the master values rounded to it is the amax of the rounded values (rounding is monotonic).

    Call after the optimizer step, on every rank of the shard group (they hold the same modules).
    """
    by_group: dict[object, list[Float8AllGatherWeight]] = {}
    for shard, group in float8_all_gather_shards(modules):
        by_group.setdefault(group, []).append(shard)
    for group, shards in by_group.items():
        amaxes = _batched_amax([shard._data for shard in shards])
        if param_dtype is not None and param_dtype != amaxes.dtype:
            amaxes = amaxes.to(param_dtype).float()
        scales = q.amax_to_scale_reference(_all_reduce_max(amaxes, group), q.E4M3)
        for shard, scale in zip(shards, scales.unbind()):
            shard.set_precomputed_scale(scale)
    return sum(len(shards) for shards in by_group.values())
