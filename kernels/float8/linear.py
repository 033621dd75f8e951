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
    scale, so dgrad sees exactly the forward's fp8 weight.
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

Tensor parallel: a DTensor weight (TP-sharded) falls back to high-precision F.linear with a one-time
warning: fp8 on local shards with per-shard scales would be valid math but the DTensor in/out
layouts are not handled yet. FSDP2 composes (the weight stays an ordinary Parameter); the fp8
all-gather of weights is not implemented (weights are gathered in their param dtype).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchtitan_like.kernels.float8 import quantize as q
from torchtitan_like.kernels.float8.gemm import resolve_backend, scaled_mm

RECIPES = ("tensorwise", "rowwise")


def _quantizers(backend: str):
    """The Triton kernels, or the torch references when emulating (CPU, no interpreter)."""
    if backend == "emulate":
        return q.tensorwise_quantize_reference_t, q.rowwise_quantize_reference, q.colwise_quantize_t_reference
    return q.tensorwise_quantize, q.rowwise_quantize, q.colwise_quantize_t


class _Float8MatmulFn(torch.autograd.Function):
    """y = x @ W^T with x 2D; all three GEMMs in fp8 (see module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, recipe, backend):
        tensorwise, rowwise, _ = _quantizers(backend)
        ctx.recipe, ctx.backend = recipe, backend
        if recipe == "tensorwise":
            x_fp8, x_fp8_t, x_scale = tensorwise(x, q.E4M3, "also")
            w_fp8, _, w_scale = tensorwise(weight, q.E4M3, "no")
            ctx.save_for_backward(x_fp8_t, x_scale, weight, w_scale)
            return scaled_mm(x_fp8, w_fp8.t(), x_scale.reciprocal(), w_scale.reciprocal(), x.dtype, backend,
                             use_fast_accum=True)
        x_fp8, x_scale = rowwise(x, q.E4M3)
        w_fp8, w_scale = rowwise(weight, q.E4M3)
        ctx.save_for_backward(x, weight)
        return scaled_mm(x_fp8, w_fp8.t(), x_scale.reciprocal(), w_scale.reciprocal().t(), x.dtype, backend,
                         use_fast_accum=True)

    @staticmethod
    def backward(ctx, grad_output):
        tensorwise, rowwise, colwise_t = _quantizers(ctx.backend)
        backend = ctx.backend
        go = grad_output.contiguous()
        need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = dw = None
        if ctx.recipe == "tensorwise":
            x_fp8_t, x_scale, weight, w_scale = ctx.saved_tensors
            go_fp8, go_fp8_t, go_scale = tensorwise(go, q.E5M2, "also")
            if need_dx:
                _, w_fp8_t, _ = tensorwise(weight, q.E4M3, "only", scale=w_scale)  # (K, N)
                dx = scaled_mm(go_fp8, w_fp8_t.t(), go_scale.reciprocal(), w_scale.reciprocal(), go.dtype, backend)
            if need_dw:
                dw = scaled_mm(go_fp8_t, x_fp8_t.t(), go_scale.reciprocal(), x_scale.reciprocal(), weight.dtype,
                               backend)
            return dx, dw, None, None
        x, weight = ctx.saved_tensors
        if need_dx:
            go_fp8, go_scale = rowwise(go, q.E4M3)            # (M, N), (M, 1)
            w_fp8_t, w_scale_t = colwise_t(weight, q.E4M3)    # (K, N), (K, 1)
            dx = scaled_mm(go_fp8, w_fp8_t.t(), go_scale.reciprocal(), w_scale_t.reciprocal().t(), x.dtype, backend)
        if need_dw:
            go_fp8_t, go_scale_t = colwise_t(go, q.E4M3)      # (N, M), (N, 1)
            x_fp8_t, x_scale_t = colwise_t(x, q.E4M3)         # (K, M), (K, 1)
            dw = scaled_mm(go_fp8_t, x_fp8_t.t(), go_scale_t.reciprocal(), x_scale_t.reciprocal().t(),
                           weight.dtype, backend)
        return dx, dw, None, None


def float8_mm(x: torch.Tensor, weight: torch.Tensor, recipe: str = "tensorwise", backend: str = "triton") -> torch.Tensor:
    """Differentiable x (..., K) @ weight(N, K)^T in fp8; backend already resolved
    ("triton" | "torch" | "emulate")."""
    if recipe not in RECIPES:
        raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
    x2d = x.reshape(-1, x.shape[-1])
    y = _Float8MatmulFn.apply(x2d if x2d.is_contiguous() else x2d.contiguous(), weight, recipe, backend)
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
    input's device (gemm.resolve_backend).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: str = "tensorwise", backend: str = "auto", emulate: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if recipe not in RECIPES:
            raise ValueError(f"float8 recipe must be one of {RECIPES}, got {recipe!r}")
        self.recipe, self.backend, self.emulate = recipe, backend, emulate
        self._warned_dtensor = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, recipe: str = "tensorwise", backend: str = "auto",
                    emulate: bool = False) -> "Float8Linear":
        """Wrap `linear`'s own Parameter objects (no copy); built on meta so nothing is allocated."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                  recipe=recipe, backend=backend, emulate=emulate)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if type(weight).__name__ == "DTensor" or type(x).__name__ == "DTensor":
            if not self._warned_dtensor:
                from torchtitan_like.logging import logger
                logger.warning("Float8Linear: DTensor (tensor-parallel) weight; running this layer in high precision")
                self._warned_dtensor = True
            return F.linear(x, weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):  # match nn.Linear under autocast: compute in its dtype
            x = x.to(torch.get_autocast_dtype(x.device.type))
        backend = resolve_backend(self.backend, x.device, self.emulate)
        y = float8_mm(x, weight, self.recipe, backend)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}, backend={self.backend}, emulate={self.emulate}"
