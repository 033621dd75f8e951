"""Float8Linear: nn.Linear whose three GEMMs run in fp8 with dynamic scaling (torchao's recipes).

For y = x @ W^T with x (M, K), W (N, K), grad_output go (M, N):

    forward  y  = x  @ W^T     contraction over K
    dgrad    dx = go @ W       contraction over N
    wgrad    dW = go^T @ x     contraction over M

Each operand is cast to fp8 with scale = FP8_MAX / amax (quantize.py) and each GEMM multiplies the
fp32 accumulator by the reciprocal scales (gemm.py). Master weight, output and gradients stay in
high precision: y and dx in x's dtype, dW in the weight's dtype.

recipe "tensorwise" (one scale per tensor; torchao's TENSORWISE):
    x, W in e4m3fn; go in e5m2 (gradients need range more than precision).
    One cast kernel writes x_fp8 and x_fp8^T (saved for wgrad, half the bytes of bf16 x) and one
    writes go_fp8 and go_fp8^T. W is saved in high precision (under FSDP that is the unsharded
    parameter, which FSDP frees and re-gathers) and re-cast transposed in backward with the forward
    scale, so dgrad sees exactly the forward's fp8 weight. With save_fp8_weight the forward cast
    writes W^T too and that is saved instead: the same bits, without reading W a second time
    (float8.save_fp8_weight; by default on when FSDP does not shard the weights).
recipe "rowwise" (one scale per row of each GEMM operand, along its contraction dim; torchao's ROWWISE):
    e4m3fn for x, W and go. Per-row scales track each gradient row's range, so e4m3's extra
    mantissa bit is worth more than e5m2's range (torchao's choice as well).
    forward: x per row (M, 1) over K, W per row (N, 1) over K.
    dgrad:   go per row (M, 1) over N, W per column (1, K) over N.
    wgrad:   go per column (N, 1) over M, x per column (1, K) over M.
    The column-wise casts write the transposed copy the GEMM reads. x and W are saved in high
    precision because backward needs different scalings of them.
torchao rounds rowwise scales down to powers of two; we keep exact scales (documented difference).

The forward GEMM uses fast accumulation, dgrad and wgrad do not (torchao's default Float8GemmConfig).

Tensor parallel (DTensor weight from ColwiseParallel / RowwiseParallel): the three GEMMs run on the
local shards, and every amax that spans shards is max-reduced over the TP group before its scale is
taken, so each element is cast with exactly the scale the unsharded layer would use:

    colwise  W Shard(0), x Replicate -> y Shard(-1); dx = go_local @ W_local is a partial sum.
             Spanning shards: W's tensor scale, and go over N (its tensor scale, or in the rowwise
             recipe the dgrad scales of go rows and of W columns).
    rowwise  W Shard(1), x Shard(-1) -> y Partial (the style reduces it); dx, dW local.
             Spanning shards: x and W along K (tensor scales, or rowwise the forward row scales).

Casts whose amax needs the reduction run as torch ops (amax, all-reduce, multiply, cast; bit-equal to
the kernels), the rest in the Triton kernels, called as custom ops (cast_ops.py) so that under
torch.compile the sibling linears that read one input (q/k/v; w1/w3) share its cast. FSDP2 composes: by default weights are gathered in
their param dtype and cast here; with float8.enable_fsdp_float8_all_gather (tensorwise, fsdp.py)
FSDP2 gathers them already in fp8 and the forward GEMM and dgrad use that data and its scale as is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchtitan_like.kernels.float8 import cast_ops
from torchtitan_like.kernels.float8 import quantize as q
from torchtitan_like.kernels.float8.fsdp import Float8GatheredWeight
from torchtitan_like.kernels.float8.gemm import resolve_backend, scaled_mm

RECIPES = ("tensorwise", "rowwise")


@dataclass(frozen=True)
class AmaxReduction:
    """Which amaxes of one fp8 matmul span tensor-parallel shards (max-reduced over `group`).

    x, weight: the forward scales of x and W; grad_output: the dgrad scales of grad_output;
    weight_t: the rowwise recipe's dgrad scales of W (per column, over N).
    """

    group: object
    x: bool = False
    weight: bool = False
    grad_output: bool = False
    weight_t: bool = False

    @staticmethod
    def for_layout(layout: str, recipe: str, group) -> "AmaxReduction":
        """The reductions of a "colwise" (W split over N) or "rowwise" (W split over K) layer."""
        if layout == "rowwise":
            return AmaxReduction(group, x=True, weight=True)
        if recipe == "tensorwise":
            return AmaxReduction(group, weight=True, grad_output=True)
        return AmaxReduction(group, grad_output=True, weight_t=True)


def _all_reduce_max(amax: torch.Tensor, group) -> torch.Tensor:
    import torch.distributed._functional_collectives as funcol  # traceable under torch.compile

    return funcol.wait_tensor(funcol.all_reduce(amax, "max", group))


class _Quantizers:
    """The casts one matmul needs: Triton kernels, or the torch references when emulating; a cast
    whose amax spans TP shards (`group` given) reduces its amax first and casts in torch."""

    def __init__(self, backend: str):
        emulate = backend == "emulate"
        # the kernels as custom ops: under torch.compile, casts of one input by sibling linears merge
        self._tensorwise = q.tensorwise_quantize_reference_t if emulate else cast_ops.tensorwise_quantize
        self._rowwise = q.rowwise_quantize_reference if emulate else cast_ops.rowwise_quantize
        self._colwise_t = q.colwise_quantize_t_reference if emulate else cast_ops.colwise_quantize_t

    def tensorwise(self, t, dtype, transpose, scale=None, group=None):
        """(t_fp8 | None, t_fp8^T | None, scale) with one scale; `scale` reuses an earlier one."""
        if scale is None and group is not None:
            scale = q.amax_to_scale_reference(_all_reduce_max(t.abs().amax().float(), group), dtype)
        return self._tensorwise(t, dtype, transpose, scale=scale)

    def rowwise(self, t, dtype, group=None):
        """(t_fp8 (R, C), scale (R, 1)): one scale per row."""
        if group is None:
            return self._rowwise(t, dtype)
        scale = q.amax_to_scale_reference(_all_reduce_max(t.abs().amax(dim=1, keepdim=True).float(), group), dtype)
        return q.to_float8_reference(t, scale, dtype), scale

    def colwise_t(self, t, dtype, group=None):
        """(t^T fp8 (C, R) contiguous, scale (C, 1)): one scale per column, written transposed."""
        if group is None:
            return self._colwise_t(t, dtype)
        amax = _all_reduce_max(t.abs().amax(dim=0, keepdim=True).float(), group).t()
        scale = q.amax_to_scale_reference(amax, dtype)
        return q.to_float8_reference(t.t(), scale, dtype).contiguous(), scale


class _Float8MatmulFn(torch.autograd.Function):
    """y = x @ W^T with x 2D; all three GEMMs in fp8 (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, recipe, backend, reduction, save_fp8_weight):
        cast = _Quantizers(backend)
        group = _groups(reduction)
        ctx.recipe, ctx.backend, ctx.reduction = recipe, backend, reduction
        ctx.weight_dtype = weight.dtype
        if recipe == "tensorwise":
            x_fp8, x_fp8_t, x_scale = cast.tensorwise(x, q.E4M3, "also", group=group["x"])
            if isinstance(weight, Float8GatheredWeight):  # FSDP2 gathered it in fp8 (fsdp.py)
                # a copy: FSDP2 refreshes the gathered scale in place before backward
                w_fp8, w_scale = weight._data, weight._scale.clone()
                saved_weight = weight
            elif save_fp8_weight:  # write W^T in fp8 now (one pass), so backward need not read W again
                w_fp8, saved_weight, w_scale = cast.tensorwise(weight, q.E4M3, "also", group=group["weight"])
            else:
                w_fp8, _, w_scale = cast.tensorwise(weight, q.E4M3, "no", group=group["weight"])
                saved_weight = weight
            ctx.save_for_backward(x_fp8_t, x_scale, saved_weight, w_scale)
            return scaled_mm(x_fp8, w_fp8.t(), x_scale.reciprocal(), w_scale.reciprocal(), x.dtype, backend,
                             use_fast_accum=True)
        x_fp8, x_scale = cast.rowwise(x, q.E4M3, group["x"])
        w_fp8, w_scale = cast.rowwise(weight, q.E4M3, group["weight"])
        ctx.save_for_backward(x, weight)
        return scaled_mm(x_fp8, w_fp8.t(), x_scale.reciprocal(), w_scale.reciprocal().t(), x.dtype, backend,
                         use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):
        cast = _Quantizers(ctx.backend)
        group = _groups(ctx.reduction)
        backend = ctx.backend
        go = grad_output.contiguous()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if ctx.recipe == "tensorwise":
            x_fp8_t, x_scale, weight, w_scale = ctx.saved_tensors
            go_fp8, go_fp8_t, go_scale = cast.tensorwise(go, q.E5M2, "also", group=group["grad_output"])
            if need_dx:
                if isinstance(weight, Float8GatheredWeight):  # same bits as re-casting with w_scale
                    w_fp8_t = weight._data.t().contiguous()  # (K, N)
                elif weight.dtype == q.E4M3:  # the forward's W^T (save_fp8_weight)
                    w_fp8_t = weight
                else:
                    _, w_fp8_t, _ = cast.tensorwise(weight, q.E4M3, "only", scale=w_scale)  # (K, N)
                dx = scaled_mm(go_fp8, w_fp8_t.t(), go_scale.reciprocal(), w_scale.reciprocal(), go.dtype, backend)
            if need_dw:
                dw = scaled_mm(go_fp8_t, x_fp8_t.t(), go_scale.reciprocal(), x_scale.reciprocal(), ctx.weight_dtype,
                               backend)
            return dx, dw, None, None, None, None
        x, weight = ctx.saved_tensors
        if need_dx:
            go_fp8, go_scale = cast.rowwise(go, q.E4M3, group["grad_output"])          # (M, N), (M, 1)
            w_fp8_t, w_scale_t = cast.colwise_t(weight, q.E4M3, group["weight_t"])     # (K, N), (K, 1)
            dx = scaled_mm(go_fp8, w_fp8_t.t(), go_scale.reciprocal(), w_scale_t.reciprocal().t(), x.dtype, backend)
        if need_dw:
            go_fp8_t, go_scale_t = cast.colwise_t(go, q.E4M3)      # (N, M), (N, 1)
            x_fp8_t, x_scale_t = cast.colwise_t(x, q.E4M3)         # (K, M), (K, 1)
            dw = scaled_mm(go_fp8_t, x_fp8_t.t(), go_scale_t.reciprocal(), x_scale_t.reciprocal().t(),
                           weight.dtype, backend)
        return dx, dw, None, None, None, None


def _groups(reduction: AmaxReduction | None) -> dict:
    """operand -> the group its amax is reduced over, or None (local amax)."""
    names = ("x", "weight", "grad_output", "weight_t")
    if reduction is None:
        return dict.fromkeys(names)
    return {name: reduction.group if getattr(reduction, name) else None for name in names}


def float8_mm(x: torch.Tensor, weight: torch.Tensor, recipe: str = "tensorwise", backend: str = "triton",
              reduction: AmaxReduction | None = None, save_fp8_weight: bool = False) -> torch.Tensor:
    """Differentiable x (..., K) @ weight(N, K)^T in fp8; backend already resolved
    ("triton" | "torch" | "emulate"); `reduction` for the local shards of a TP layer.
    save_fp8_weight (tensorwise): keep the forward's fp8 W^T for dgrad instead of W (same bits)."""
    if recipe not in RECIPES:
        raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
    x2d = x.reshape(-1, x.shape[-1])
    y = _Float8MatmulFn.apply(x2d if x2d.is_contiguous() else x2d.contiguous(), weight, recipe, backend, reduction,
                              save_fp8_weight and recipe == "tensorwise")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def float8_linear_reference(x: torch.Tensor, weight: torch.Tensor, grad_output: torch.Tensor, recipe: str):
    """(y, dx, dW) by quantize -> dequantize -> fp32 matmul, with the recipe's scales, in plain torch."""
    def fake_quant(t, dtype, dim):  # dim: None (tensorwise) or the dim the amax reduces over
        amax = t.abs().amax() if dim is None else t.abs().amax(dim=dim, keepdim=True)
        scale = q.amax_to_scale_reference(amax, dtype)
        return q.to_float8_reference(t, scale, dtype).float() / scale

    x, go = x.reshape(-1, x.shape[-1]), grad_output.reshape(-1, grad_output.shape[-1])
    if recipe == "tensorwise":
        xq, wq, goq = fake_quant(x, q.E4M3, None), fake_quant(weight, q.E4M3, None), fake_quant(go, q.E5M2, None)
        return xq @ wq.t(), goq @ wq, goq.t() @ xq
    y = fake_quant(x, q.E4M3, 1) @ fake_quant(weight, q.E4M3, 1).t()
    dx = fake_quant(go, q.E4M3, 1) @ fake_quant(weight, q.E4M3, 0)
    dw = fake_quant(go, q.E4M3, 0).t() @ fake_quant(x, q.E4M3, 0)
    return y, dx, dw


class Float8Linear(nn.Linear):
    """Drop-in nn.Linear (same `weight`/`bias` parameters and names) computing its GEMMs in fp8.

    recipe: "tensorwise" | "rowwise"; backend: "auto" | "triton" | "torch"; emulate: dequantized
    fp32 matmuls and torch-reference casts (any device). "auto" is resolved per call from the
    input's device (gemm.resolve_backend). save_fp8_weight (tensorwise): the forward cast also writes
    W^T in fp8 and backward uses it, instead of reading W again to re-cast it (1 byte per weight
    element held until backward; worth it when W stays resident anyway, i.e. not sharded by FSDP).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: str = "tensorwise", backend: str = "auto", emulate: bool = False,
                 save_fp8_weight: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if recipe not in RECIPES:
            raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
        self.recipe, self.backend, self.emulate = recipe, backend, emulate
        self.save_fp8_weight = save_fp8_weight
        self._warned_dtensor = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recipe: str = "tensorwise", backend: str = "auto",
                    emulate: bool = False, save_fp8_weight: bool = False) -> "Float8Linear":
        """Wrap `linear`'s own Parameter objects (no copy); built on meta so nothing is allocated."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe, backend=backend, emulate=emulate, save_fp8_weight=save_fp8_weight)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):  # match nn.Linear under autocast: compute in its dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        backend = resolve_backend(self.backend, x.device, self.emulate)
        if _is_dtensor(self.weight) or _is_dtensor(x):
            return self._forward_tensor_parallel(x, backend)
        y = float8_mm(x, self.weight, self.recipe, backend, save_fp8_weight=self.save_fp8_weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _forward_tensor_parallel(self, x, backend: str):
        """fp8 on the local shards of a ColwiseParallel / RowwiseParallel layer (module docstring);
        other layouts run in high precision with a one-time warning."""
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

        weight = self.weight
        layout = _tensor_parallel_layout(weight, x)
        if layout is None:
            if not self._warned_dtensor:
                from torchtitan_like.logging import logger
                placements = getattr(weight, "placements", None)
                logger.warning(f"Float8Linear: weight placements {placements} are not a 1-D colwise/rowwise "
                               "tensor-parallel layout; running this layer in high precision")
                self._warned_dtensor = True
            return F.linear(x, weight, self.bias)
        mesh, last_dim = weight.device_mesh, x.ndim - 1
        reduction = AmaxReduction.for_layout(layout, self.recipe, mesh.get_group())
        if layout == "colwise":
            x = x.redistribute(mesh, [Replicate()])
            # every rank's dx is a partial sum over its slice of N
            y_local = float8_mm(x.to_local(grad_placements=[Partial()]), weight.to_local(), self.recipe, backend,
                                reduction, self.save_fp8_weight)
            if self.bias is not None:
                y_local = y_local + self.bias.to_local().to(y_local.dtype)
            return DTensor.from_local(y_local, mesh, [Shard(last_dim)], run_check=False)
        x = x.redistribute(mesh, [Shard(last_dim)])
        y_local = float8_mm(x.to_local(), weight.to_local(), self.recipe, backend, reduction, self.save_fp8_weight)
        y = DTensor.from_local(y_local, mesh, [Partial()], run_check=False)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, recipe={self.recipe}, backend={self.backend}, emulate={self.emulate}, "
                f"save_fp8_weight={self.save_fp8_weight}")


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _tensor_parallel_layout(weight, x) -> str | None:
    """"colwise" (W Shard(0)), "rowwise" (W Shard(1)) on a 1-D mesh with a DTensor input, else None."""
    from torch.distributed.tensor import Shard

    if not (_is_dtensor(weight) and _is_dtensor(x)) or weight.device_mesh.ndim != 1 or x.device_mesh != weight.device_mesh:
        return None
    placement = weight.placements[0]
    if placement == Shard(0):
        return "colwise"
    if placement == Shard(1):
        return "rowwise"
    return None
