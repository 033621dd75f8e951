"""Fused AdamW / Adam optimizer step in Triton that reads p, g, m, v and writes p, m, v: 28 bytes per
fp32 parameter, where torch's fused kernel with a `grad_scale` (our gradient clip) moves 32.

Math, per element, in torch's order of operations (Loshchilov & Hutter, 2019, for the decoupled decay;
Kingma & Ba, 2015, for the rest); t is the step count after the increment, all arithmetic in fp32:

    g  = g / grad_scale                           only with optimizer.grad_scale (the clip's divisor)
    p  = p * (1 - lr * wd)                        AdamW: decoupled weight decay
    g  = g + wd * p                               Adam: L2 weight decay, before the moments
    m  = lerp(m, g, 1 - beta1)                    as torch.lerp: m + w (g - m) for w < 0.5
    v  = beta2 v + (1 - beta2) g^2
    denom = sqrt(v) / sqrt(1 - beta2^t) + eps
    p  = p - (lr / (1 - beta1^t)) m / denom

The scalars (1 - lr wd, the bias corrections, the step size) are computed on the host in double from
`state["step"]`, a CPU float32 tensor as in torch's non-fused AdamW, so a step never syncs with the
device. One program updates BLOCK contiguous elements of one parameter; offsets are int64 so tensors
over 2^31 elements work. The gradient is read, never written: after a step with `grad_scale` the
gradients stay unclipped (torch's fused kernel stores the divided gradient back).

`TritonAdamW` / `TritonAdam` are torch.optim.AdamW / Adam with this step: same arguments, same param
groups and same state (`step`, `exp_avg`, `exp_avg_sq`), so state dicts load both ways. For DTensor
parameters (FSDP2, tensor parallel) the states are DTensors as in torch, and the kernel runs on the
local shards (on the tensor inside a shard that FSDP2 all-gathers in float8). amsgrad, maximize,
capturable, differentiable, fused/foreach, complex parameters raise ValueError at construction (and
sparse gradients at the step): use torch's classes for those. The kernel runs on CUDA, and on CPU
only under the Triton interpreter (TRITON_INTERPRET=1 when this module is imported); otherwise the
base class's for-loop step runs, with the gradients first divided by `grad_scale` in place.
`adam_step_reference` is the plain-torch math the tests compare against.

Rounding: fmas where torch's CPU kernels round once (lerp, addcmul, add with alpha) and IEEE sqrt, so
the interpreter matches torch's for-loop AdamW (moments bit for bit); bf16 results are rounded once
to nearest even (by hand under the interpreter, whose fp32 -> bf16 cast truncates).
Split master weights (torchtitan_like/master_weights.py): a bf16 parameter with an int16
`_master_lo` is the fp32 master bit for bit; the kernel joins the halves, updates the fp32 value and
writes both halves back: 26 bytes per parameter with a bf16 gradient (the master 4 read and 4
written, the gradient 2, the fp32 moments 8 and 8). The moments are fp32, and `main_grad` (the fp32
gradient accumulation) is read when set.
Checkpoints: torch's load_state_dict keeps the saved groups' options, `fused`/`foreach` included;
loading resets them here, but a TritonAdamW checkpoint loaded into torch's fused AdamW turns its
groups to fused=False (its for-loop step), as a foreach checkpoint would.
"""

import contextlib
import types

import torch

from torchtitan_like import master_weights
from torchtitan_like.distributed.tensors import is_dtensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the module still imports, the fallback step works
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

# Elements per program and warps: 8 fp32 per thread, two 16-byte loads of each of the four tensors.
# On an H200 (torch 2.11, triton 3.6, Llama 3.1 8B cut to 8 layers, 2.8 G fp32 parameters) a step
# took 19.1-19.3 ms with BLOCK 512-1024 at 2-8 warps, 19.7-20.1 ms with 2048-8192 (4,050-4,100 GB/s
# against a 4,070 GB/s copy; torch's fused AdamW with grad_scale 27.0 ms), benchmarks/bench_optimizer.py
# --sweep.
BLOCK = 1024
NUM_WARPS = 4
UNSUPPORTED_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable", "fused", "foreach")


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _round_to(x, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """x (fp32) in `dtype`, rounded to nearest even. The Triton interpreter's fp32 -> bf16 cast
    truncates (GPUs round), so there bf16 is rounded by hand on the bits; NaNs keep the plain cast."""
    if BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x == x, rounded, x.to(tl.bfloat16))
    return x.to(dtype)


@_jit
def _adam_step_kernel(PARAM, GRAD, EXP_AVG, EXP_AVG_SQ, GRAD_SCALE, LOW, n_elements,
                      param_decay_factor, l2_weight_decay, lerp_weight, beta2, one_minus_beta2,
                      bias_correction2_sqrt, eps, step_size,
                      BLOCK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, DECOUPLED_DECAY: tl.constexpr,
                      L2_DECAY: tl.constexpr, LERP_FROM_START: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                      SPLIT: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int32 overflows past 2**31
    mask = offsets < n_elements
    if SPLIT:  # a bf16 parameter and its int16 remainder: the fp32 master, bit for bit (master_weights.py)
        high = tl.load(PARAM + offsets, mask=mask, other=0.0).to(tl.int16, bitcast=True).to(tl.int32)
        low = tl.load(LOW + offsets, mask=mask, other=0).to(tl.int32)
        param = ((high << 16) + low).to(tl.float32, bitcast=True)
    else:
        param = tl.load(PARAM + offsets, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(GRAD + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg = tl.load(EXP_AVG + offsets, mask=mask, other=0.0).to(tl.float32)
    exp_avg_sq = tl.load(EXP_AVG_SQ + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD_SCALE:
        grad = grad / tl.load(GRAD_SCALE)
    if DECOUPLED_DECAY:
        param = param * param_decay_factor
    # Explicit fmas where torch's CPU kernels round once (add with alpha, lerp, addcmul), so the
    # interpreter matches torch's for-loop AdamW to the bit; the GPU would contract them anyway.
    if L2_DECAY:
        grad = tl.fma(param, l2_weight_decay, grad)
    # torch.lerp's two forms: from the nearer end, which keeps the rounding error small
    if LERP_FROM_START:
        exp_avg = tl.fma(lerp_weight, grad - exp_avg, exp_avg)
    else:
        exp_avg = tl.fma(lerp_weight - 1.0, grad - exp_avg, grad)
    exp_avg_sq = tl.fma(one_minus_beta2 * grad, grad, exp_avg_sq * beta2)
    # sqrt_rn: IEEE rounding as torch's sqrt (tl.sqrt is the approximate instruction on GPUs)
    denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + eps
    param = param - step_size * exp_avg / denom
    if SPLIT:
        # round the bit pattern to its top 16 bits, ties away from zero; the remainder fits int16
        biased = param.to(tl.int32, bitcast=True) + 0x8000
        high = (biased >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True)
        low = ((biased & 0xFFFF) - 0x8000).to(tl.int16)
        is_number = param == param
        tl.store(PARAM + offsets, tl.where(is_number, high, param.to(tl.bfloat16)), mask=mask)
        tl.store(LOW + offsets, tl.where(is_number, low, 0).to(tl.int16), mask=mask)
    else:
        tl.store(PARAM + offsets, _round_to(param, PARAM.dtype.element_ty, BF16_BY_HAND), mask=mask)
    tl.store(EXP_AVG + offsets, _round_to(exp_avg, EXP_AVG.dtype.element_ty, BF16_BY_HAND), mask=mask)
    tl.store(EXP_AVG_SQ + offsets, _round_to(exp_avg_sq, EXP_AVG_SQ.dtype.element_ty, BF16_BY_HAND), mask=mask)


def _kernels_interpreted() -> bool:
    """True when the kernel was built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_adam_step_kernel).__name__ == "InterpretedFunction"


def triton_available_for(x: torch.Tensor) -> bool:
    """Whether the Triton kernel can run on x's device: CUDA, or CPU under the Triton interpreter."""
    if triton is None:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and _kernels_interpreted()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (the update is elementwise), or the tensor itself."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def _local_param(param: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory the step updates: the local shard, or, for a shard that FSDP2
    all-gathers in float8 (`Float8AllGatherWeight`, kernels/float8/fsdp.py), the tensor it wraps.
    That wrapper has no storage of its own, so the kernel cannot take its pointer; and the kernel's
    writes bypass its __torch_dispatch__, so the all-gather scale precomputed from the old values is
    dropped here, as an in-place torch op would drop it. It is the DTensor's own `_local_tensor`:
    from torch 2.13 on, `to_local()` of a Parameter returns a new view of it (a new wrapper)."""
    from torchtitan_like.kernels.float8.fsdp import Float8AllGatherWeight

    local = getattr(param, "_local_tensor", None)
    if isinstance(local, Float8AllGatherWeight):
        local._forget_precomputed_scale()
        return local._data
    return _local(param)


def _in_layout_of(param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient in its parameter's DTensor layout. Under pure tensor parallel they differ: the
    vocab-sharded embedding's gradient arrives replicated, a sequence-parallel norm's as a partial
    sum. The kernel pairs local elements, so it needs the same layout; torch's optimizers get it
    implicitly, through DTensor ops."""
    if is_dtensor(grad) and is_dtensor(param) and grad.placements != param.placements:
        return grad.redistribute(param.device_mesh, param.placements)
    return grad


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, *,
               step: float, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
               decoupled_weight_decay: bool, grad_scale: torch.Tensor | None = None,
               low: torch.Tensor | None = None) -> None:
    """One in-place AdamW (decoupled) or Adam (L2) update of plain tensors on one device, `step` the
    count after this step's increment; `grad_scale`, a 0-d fp32 tensor on the same device, divides g.
    With `low` (int16), `param` is a split master weight's bf16 half (master_weights.py): the update
    is of the fp32 value the two form, and both halves are written."""
    if not (param.shape == grad.shape == exp_avg.shape == exp_avg_sq.shape):
        raise ValueError(f"adam_step_: shapes differ: param {tuple(param.shape)}, grad {tuple(grad.shape)}, "
                         f"exp_avg {tuple(exp_avg.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}")
    if low is not None and (low.shape != param.shape or low.dtype != torch.int16 or param.dtype != torch.bfloat16):
        raise ValueError(f"adam_step_: a split parameter is bf16 with an int16 remainder of its shape; got "
                         f"param {param.dtype} {tuple(param.shape)}, low {low.dtype} {tuple(low.shape)}")
    n_elements = param.numel()
    if n_elements == 0:
        return
    # The kernel walks flat memory: a strided tensor is updated through a contiguous copy.
    tensors = (param, grad, exp_avg, exp_avg_sq) + ((low,) if low is not None else ())
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    # Host scalars in double, as torch computes them; floats throughout so Triton compiles one variant.
    lr, beta1, beta2, eps, weight_decay, step = map(float, (lr, beta1, beta2, eps, weight_decay, step))
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    lerp_weight = 1 - beta1
    with torch.cuda.device(param.device) if param.is_cuda else contextlib.nullcontext():
        _adam_step_kernel[(triton.cdiv(n_elements, BLOCK),)](
            work[0], work[1], work[2], work[3], grad_scale if grad_scale is not None else work[0],
            work[4] if low is not None else work[0], n_elements,
            1 - lr * weight_decay, weight_decay, lerp_weight, beta2, 1 - beta2,
            bias_correction2 ** 0.5, eps, lr / bias_correction1,
            BLOCK=BLOCK, HAS_GRAD_SCALE=grad_scale is not None,
            DECOUPLED_DECAY=decoupled_weight_decay and weight_decay != 0,
            L2_DECAY=not decoupled_weight_decay and weight_decay != 0,
            LERP_FROM_START=abs(lerp_weight) < 0.5, BF16_BY_HAND=not param.is_cuda, SPLIT=low is not None,
            num_warps=NUM_WARPS)
    for original, updated in zip((param, exp_avg, exp_avg_sq, low), (work[0], work[2], work[3], work[-1])):
        if original is None:
            continue
        if updated is not original:
            original.copy_(updated)


def adam_step_reference(param, grad, exp_avg, exp_avg_sq, *, step, lr, beta1, beta2, eps, weight_decay,
                        decoupled_weight_decay, grad_scale=None, low=None) -> None:
    """The same update in plain torch ops (fp32 math, results stored in each tensor's dtype; with
    `low`, of the split master weight `param` and `low` form)."""
    p = master_weights.join(param, low) if low is not None else param.float()
    g, m, v = (t.float() for t in (grad, exp_avg, exp_avg_sq))
    if grad_scale is not None:
        g = g / grad_scale
    if weight_decay != 0 and decoupled_weight_decay:
        p = p * (1 - lr * weight_decay)
    elif weight_decay != 0:
        g = g + weight_decay * p
    m = torch.lerp(m, g, 1 - beta1)
    v = v * beta2 + (1 - beta2) * g * g
    denom = v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
    p = p - (lr / (1 - beta1 ** step)) * m / denom
    if low is not None:
        high, remainder = master_weights.split(p)
        param.copy_(high)
        low.copy_(remainder)
    else:
        param.copy_(p)
    for target, value in ((exp_avg, m), (exp_avg_sq, v)):
        target.copy_(value)


def _check_group(group: dict, name: str) -> None:
    torch_name = name.removeprefix("Triton")
    for option in UNSUPPORTED_OPTIONS:
        if group.get(option):
            raise ValueError(f"{name}: {option}={group[option]!r} is not supported; use torch.optim.{torch_name}")
    if any(torch.is_complex(param) for param in group["params"]):
        raise ValueError(f"{name}: complex parameters are not supported; use torch.optim.{torch_name}")


class _TritonAdamStep:
    """The Triton step over torch.optim.Adam's param groups and state; mixed into Adam and AdamW."""

    def __init__(self, params, *args, foreach=None, fused=None, **kwargs):
        if foreach or fused:
            raise ValueError(f"{type(self).__name__}: foreach/fused select torch's kernels; leave them unset")
        super().__init__(params, *args, foreach=False, fused=False, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _check_group(self.param_groups[-1], type(self).__name__)

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every loaded state tensor to its parameter's dtype: a split parameter is bf16,
        # its moments are fp32. Those are taken out before and put back, in fp32, after.
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        own = [param for group in self.param_groups for param in group["params"]]
        kept: dict = {}
        if any(master_weights.is_split(param) for param in own):
            state_dict = dict(state_dict, state=dict(state_dict["state"]))
            for saved_id, param in zip(saved_ids, own):
                if master_weights.is_split(param) and saved_id in state_dict["state"]:
                    entry = dict(state_dict["state"][saved_id])
                    kept[param] = {name: entry.pop(name) for name in ("exp_avg", "exp_avg_sq") if name in entry}
                    state_dict["state"][saved_id] = entry
        # A checkpoint of torch's fused or foreach optimizer carries its choice in every group: keep ours.
        super().load_state_dict(state_dict)
        for param, moments in kept.items():
            for name, value in moments.items():
                self.state[param][name] = value.to(device=param.device, dtype=master_weights.MASTER_DTYPE)
        for group in self.param_groups:
            group["fused"], group["foreach"] = False, False
            _check_group(group, type(self).__name__)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        master_weights.zero_main_grads((param for group in self.param_groups for param in group["params"]),
                                       set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for group in self.param_groups for p in group["params"] if master_weights.gradient_of(p) is not None]
        for param in params:
            if master_weights.gradient_of(param).is_sparse:
                raise ValueError(f"{type(self).__name__}: sparse gradients are not supported")
        if all(triton_available_for(param) for param in params):
            self._step_each(adam_step_)
        elif any(master_weights.is_split(param) for param in params):
            self._step_each(adam_step_reference)  # torch's steps would update the bf16 halves alone
        else:
            self._fallback_step(params)
        return loss

    def _fallback_step(self, params: list[torch.Tensor]) -> None:
        """torch's for-loop step, the clip's division done first (that step refuses a grad_scale)."""
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is None:
            super().step()
            return
        by_device: dict = {}
        for param in params:
            grad = _local(param.grad)
            by_device.setdefault(grad.device, []).append(grad)
        for device, grads in by_device.items():
            torch._foreach_div_(grads, grad_scale.to(device))
        del self.grad_scale
        try:
            super().step()
        finally:
            self.grad_scale = grad_scale

    def _step_each(self, update) -> None:
        """`update` (the kernel's `adam_step_`, or `adam_step_reference`) on every parameter with a gradient."""
        grad_scale = getattr(self, "grad_scale", None)
        scale_on: dict = {}  # the divisor copied once per device
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            decoupled = group.get("decoupled_weight_decay", isinstance(self, torch.optim.AdamW))
            for param in group["params"]:
                grad = master_weights.gradient_of(param)
                if grad is None:
                    continue
                split = master_weights.is_split(param)
                state = self.state[param]
                if len(state) == 0:  # torch's lazy initialization, non-fused layout (fp32 moments when split)
                    moment_dtype = master_weights.MASTER_DTYPE if split else param.dtype
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=moment_dtype, memory_format=torch.preserve_format)
                elif state["step"].device.type != "cpu":  # from a fused/capturable checkpoint: one sync, once
                    state["step"] = state["step"].to("cpu", torch.float32)
                state["step"] += 1
                local_param = _local_param(param)
                if grad_scale is not None and local_param.device not in scale_on:
                    scale_on[local_param.device] = grad_scale.to(local_param.device, torch.float32)
                local_grad = _local(_in_layout_of(param, grad))
                update(local_param, local_grad, _local(state["exp_avg"]), _local(state["exp_avg_sq"]),
                       step=state["step"].item(), lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                       weight_decay=group["weight_decay"], decoupled_weight_decay=decoupled,
                       grad_scale=scale_on.get(local_param.device), low=param._master_lo if split else None)


class TritonAdamW(_TritonAdamStep, torch.optim.AdamW):
    """torch.optim.AdamW (decoupled weight decay) whose step is one Triton kernel per parameter."""


class TritonAdam(_TritonAdamStep, torch.optim.Adam):
    """torch.optim.Adam (L2 weight decay) whose step is one Triton kernel per parameter."""
