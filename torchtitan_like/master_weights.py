"""Split master weights: bf16 parameters that carry the rest of their fp32 value.

`training.master_weights = "split"` (one process: no FSDP, tensor or pipeline parallel). Each fp32
parameter x becomes two 16-bit tensors of its shape:

- the parameter itself, in bf16: x rounded to nearest. The model computes with it directly, as
  under FSDP's bf16 mixed precision: no per-op weight casts (autocast's), gradients come out of the
  backward in bf16 with no cast back to fp32, and activations (the residual stream included) are
  bf16;
- `param._master_lo`, int16: the difference between x's bit pattern and the bf16 one's shifted up
  16 bits, in [-32768, 32767].

Together they are x, bit for bit (`join`), in the 4 bytes per parameter an fp32 master takes: the
bf16 copy costs no memory. The Triton AdamW step (kernels/adamw.py) reads both halves, updates the
exact fp32 value and writes both halves back; checkpoints (`checkpoint/state.py`) store the joined
fp32 value, so a checkpoint is the same whatever the run's master_weights and resumes exactly.

Rounding: ties of the bit pattern (low 16 bits exactly 0x8000) round away from zero, where torch's
cast rounds to even (one case in 65,536 of the low halves): only this way does every remainder
fit in int16. NaN stays NaN in both halves (remainder 0).

With gradient accumulation (several backward passes per step) each pass's bf16 gradient is added
into an fp32 `param.main_grad` and the bf16 one freed (`accumulate_gradients_in_fp32`), so
microbatches are summed in fp32 as autocast's fp32 gradients are; the optimizer and the gradient
clip read `main_grad` when it is set (`gradient_of`).
"""

from __future__ import annotations

import torch
from torch import nn

MASTER_DTYPE = torch.float32
COMPUTE_DTYPE = torch.bfloat16


def split(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bf16 rounding, int16 remainder) of a float tensor, taken in fp32."""
    value = value.detach().to(MASTER_DTYPE).contiguous()
    bits = value.view(torch.int32)
    biased = bits + 0x8000  # wraps only for NaN patterns, replaced below
    high = (biased >> 16).to(torch.int16).view(COMPUTE_DTYPE)
    low = ((biased & 0xFFFF) - 0x8000).to(torch.int16)
    nan = torch.isnan(value)
    if nan.any():
        high = torch.where(nan, value.to(COMPUTE_DTYPE), high)
        low = torch.where(nan, torch.zeros_like(low), low)
    return high, low


def join(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The fp32 value of a split pair (`split`'s inverse, bit for bit)."""
    high = high.detach().contiguous().view(torch.int16).to(torch.int32)
    return ((high << 16) + low.to(torch.int32)).view(MASTER_DTYPE)


def is_split(param: torch.Tensor) -> bool:
    return getattr(param, "_master_lo", None) is not None


def master_value(param: torch.Tensor) -> torch.Tensor:
    """The fp32 value of a split parameter (a new tensor), or the parameter itself."""
    return join(param, param._master_lo) if is_split(param) else param


def gradient_of(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient an optimizer step uses: the fp32 accumulation when there is one, else `.grad`."""
    main_grad = getattr(param, "main_grad", None)
    return main_grad if main_grad is not None else param.grad


def _check_splittable(model_parts: list[nn.Module]) -> None:
    from torchtitan_like.distributed.tensors import is_dtensor

    for part in model_parts:
        for name, param in part.named_parameters():
            if is_dtensor(param):
                raise ValueError(f"master_weights = 'split' works on plain tensors; {name} is a DTensor "
                                 f"(FSDP or tensor parallel): FSDP's mixed-precision policy covers that case")
            if param.device.type == "meta":
                raise ValueError(f"master_weights = 'split': {name} is still on the meta device; "
                                 f"materialize and initialize the model first")


@torch.no_grad()
def convert_to_split(model_parts: list[nn.Module]) -> int:
    """Replace every fp32 parameter of `model_parts` by its bf16 half carrying the remainder
    (`_master_lo`); shared parameters stay shared. Call after the weights are initialized and before
    the optimizer is built (it holds the new parameters). Returns the number of parameters split."""
    _check_splittable(model_parts)
    replaced: dict[int, nn.Parameter] = {}
    for part in model_parts:
        for module in part.modules():
            for name, param in list(module._parameters.items()):
                if param is None or param.dtype != MASTER_DTYPE:
                    continue
                if id(param) not in replaced:
                    high, low = split(param)
                    new = nn.Parameter(high, requires_grad=param.requires_grad)
                    new._master_lo = low
                    replaced[id(param)] = new
                module._parameters[name] = replaced[id(param)]
    return len(replaced)


def accumulate_gradients_in_fp32(model_parts: list[nn.Module]) -> list:
    """Hooks that move each backward pass's bf16 gradient of a split parameter into an fp32
    `main_grad` (created on the first pass of a step; `zero_main_grads` clears it). Returns the
    hook handles."""
    def move_to_main_grad(param: torch.Tensor) -> None:
        with torch.no_grad():
            if getattr(param, "main_grad", None) is None:
                param.main_grad = param.grad.to(MASTER_DTYPE)
            else:
                param.main_grad.add_(param.grad)
        param.grad = None

    handles, seen = [], set()
    for part in model_parts:
        for param in part.parameters():
            if is_split(param) and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                handles.append(param.register_post_accumulate_grad_hook(move_to_main_grad))
    return handles


def zero_main_grads(params, set_to_none: bool = True) -> None:
    """Clear the fp32 accumulations as `Optimizer.zero_grad` clears `.grad`: drop them, or zero them
    in place with set_to_none=False (the hook has freed `.grad`, so a parameter without a gradient in
    the next step is still stepped with a zero one, as torch steps a zeroed `.grad`)."""
    for param in params:
        main_grad = getattr(param, "main_grad", None)
        if main_grad is None:
            continue
        if set_to_none:
            param.main_grad = None
        else:
            main_grad.zero_()
