"""Fused RMSNorm (Zhang & Sennrich, 2019) in Triton: forward, backward and a residual-add variant.

Math, per row x of length N (statistics in fp32 whatever the input dtype):

    rstd  = 1 / sqrt(mean(x^2) + eps)          saved for backward, one fp32 per row
    x_hat = x * rstd
    y     = x_hat * w

Backward, with g = dy * w:

    dx = rstd * (g - x_hat * mean(g * x_hat))
    dw = sum over rows of dy * x_hat

Fused residual add (pre-norm blocks): summed = x + residual (rounded to the input dtype, exactly as
`x + residual` in PyTorch), normed = rms_norm(summed). Backward: d(summed) = dx of the norm plus the
gradient flowing into `summed` itself, and d(x) = d(residual) = d(summed).

Kernels are written for memory bandwidth. Forward: one program per BLOCK_M rows (several rows per
program when N is small), BLOCK_N = next_power_of_2(N) so a row is one masked vector load, reading
x and w and writing y and rstd. Backward: one wave of programs (a few per SM), each owning a
contiguous run of rows that it walks a tile of BLOCK_M rows at a time, the loads of the next tiles
in flight (software pipelining); it recomputes x_hat from x and rstd, writes dx and accumulates dw
in a (BLOCK_N,) fp32 vector, written once as a partial row; a second kernel sums the partials into
dw. Launch heuristics and their overrides live in `rmsnorm_launch.py`. Inputs may be row-strided
(a slice of a wider tensor): the row stride is passed to the kernel, only a non-contiguous last
dimension forces a copy.

The ops are `torch.library.custom_op`s (`torchtitan_like::rms_norm_fwd`, `::rms_norm_bwd`,
`::fused_add_rms_norm_fwd`) with fake implementations and registered autograd, so
`torch.compile(fullgraph=True)` sees each as one node. On CPU the kernels run only under the Triton
interpreter (TRITON_INTERPRET=1 when this module is imported); `TritonRMSNorm` otherwise falls back to
`rms_norm_reference`.
"""

import contextlib
import dataclasses
import functools
import math
import types
from typing import Optional

import torch
from torch import nn

from .rmsnorm_launch import backward_grid, backward_launch, forward_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton on this platform: the module still imports, the reference path works
    triton = None
    tl = types.SimpleNamespace(constexpr=None)

MAX_HIDDEN = 65536  # a row must fit one program's registers
# Tests set this to fill every output buffer with NaN before the kernels write it, so an element a
# kernel forgets to write cannot pass as correct.
_POISON_OUTPUTS = False


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def _rms_norm_fwd_kernel(X, RESIDUAL, W, Y, SUMMED, RSTD,
                         stride_x, stride_residual, stride_y, stride_summed,
                         n_rows, n_cols, eps,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]
    rows_64 = rows.to(tl.int64)[:, None]  # row * stride overflows int32 beyond 2**31 elements
    x = tl.load(X + rows_64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(RESIDUAL + rows_64 * stride_residual + cols[None, :], mask=mask, other=0.0)
        summed = (x + residual.to(tl.float32)).to(SUMMED.dtype.element_ty)
        tl.store(SUMMED + rows_64 * stride_summed + cols[None, :], summed, mask=mask)
        x = summed.to(tl.float32)  # normalize what the caller sees, as backward recomputes from it
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
    y = x * rstd[:, None] * w[None, :]
    tl.store(Y + rows_64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@_jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DSUMMED, DX, DW_PARTIAL,
                         stride_dy, stride_x, stride_dsummed, stride_dx,
                         n_rows, n_cols, rows_per_program,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DSUMMED: tl.constexpr,
                         NUM_STAGES: tl.constexpr):
    # Program pid owns rows [first_row, last_row) and walks them BLOCK_M rows at a time. The tile's
    # rows sit in each thread's registers, so the per-tile column sum into dw_acc is thread-local
    # and dw_acc is one (BLOCK_N,) fp32 vector, not a tile.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    first_row = pid * rows_per_program
    last_row = tl.minimum(first_row + rows_per_program, n_rows)
    dw_acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for block_start in tl.range(first_row, last_row, BLOCK_M, num_stages=NUM_STAGES):
        rows = block_start + tl.arange(0, BLOCK_M)
        row_mask = rows < last_row
        mask = row_mask[:, None] & col_mask[None, :]
        rows_64 = rows.to(tl.int64)[:, None]  # row * stride overflows int32 beyond 2**31 elements
        x = tl.load(X + rows_64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows_64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # w is re-read per tile (an L1 hit) rather than held across the loop: registers are better
        # spent on loads in flight.
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        x_hat = x * rstd[:, None]
        g = dy * w[None, :]
        mean_g_xhat = tl.sum(g * x_hat, axis=1) / n_cols
        dx = (g - x_hat * mean_g_xhat[:, None]) * rstd[:, None]
        if HAS_DSUMMED:
            dx += tl.load(DSUMMED + rows_64 * stride_dsummed + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows_64 * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x_hat, axis=0)  # masked rows and columns load as 0 and add nothing
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=col_mask)


@_jit
def _sum_partials_kernel(PARTIAL, OUT, n_partials, n_cols,
                         BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """OUT[c] = sum over p of PARTIAL[p, c] in fp32, one program per BLOCK_C columns."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < n_cols
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for start in range(0, n_partials, BLOCK_P):
        rows = start + tl.arange(0, BLOCK_P)
        mask = (rows < n_partials)[:, None] & col_mask[None, :]
        acc += tl.load(PARTIAL + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------- launch
def _kernels_interpreted() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_rms_norm_fwd_kernel).__name__ == "InterpretedFunction"


def triton_available_for(x: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on x's device: CUDA, or CPU under the Triton interpreter."""
    if triton is None or x.shape[-1] > MAX_HIDDEN:
        return False
    if x.is_cuda:
        return True
    return x.device.type == "cpu" and _kernels_interpreted()


def _check_hidden(n_cols: int) -> None:
    if n_cols > MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {n_cols} exceeds the kernel's limit {MAX_HIDDEN}; "
                         "use rms_norm_reference")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; on the CPU interpreter 3, so a few programs each loop over several tiles."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        out.fill_(math.nan)
    return out


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., N) -> (rows, N), a view keeping the row stride when the last dim is contiguous."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n_cols)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor] = None) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"rms_norm: weight shape {tuple(weight.shape)} does not match hidden size {x.shape[-1]}")
    if x.shape[-1] == 0:
        raise ValueError("rms_norm: hidden size must be positive")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: x on {x.device} but weight on {weight.device}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError("fused_add_rms_norm: residual must have x's shape and dtype")


def _forward(x, residual, weight, eps):
    """Launch the forward kernel; returns (y, summed or None, rstd)."""
    _check(x, weight, residual)
    n_cols = x.shape[-1]
    _check_hidden(n_cols)
    y = _new_output(x.shape, x.dtype, x.device)
    summed = _new_output(x.shape, x.dtype, x.device) if residual is not None else None
    rstd = _new_output(x.shape[:-1], torch.float32, x.device)
    n_rows = rstd.numel()
    if n_rows == 0:
        return y, summed, rstd
    launch = forward_launch(n_cols)
    x_rows = _as_rows(x, n_cols)
    residual_rows = _as_rows(residual, n_cols) if residual is not None else x_rows
    summed_rows = summed.view(-1, n_cols) if summed is not None else y.view(-1, n_cols)
    y_rows = y.view(-1, n_cols)
    grid = (triton.cdiv(n_rows, launch.block_m),)
    with _on_device(x):
        _rms_norm_fwd_kernel[grid](
            x_rows, residual_rows, weight.contiguous(), y_rows, summed_rows, rstd,
            x_rows.stride(0), residual_rows.stride(0), y_rows.stride(0), summed_rows.stride(0),
            n_rows, n_cols, eps,
            BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, HAS_RESIDUAL=residual is not None,
            num_warps=launch.num_warps)
    return y, summed, rstd


try:
    from triton.runtime.errors import OutOfResources as _OUT_OF_RESOURCES
except ImportError:
    _OUT_OF_RESOURCES = ()
# (device, dtype, heuristic launch, residual variant) -> pipeline stages that fit in shared memory
_stages_that_fit: dict = {}


def _launch_backward(grid, *args, **meta):
    _rms_norm_bwd_kernel[grid](*args, **meta)


def _backward(dy, x, weight, rstd, dsummed):
    """Launch the backward kernel and the dw reduction; returns (dx, dw)."""
    n_cols = x.shape[-1]
    _check_hidden(n_cols)
    dx = _new_output(x.shape, x.dtype, x.device)
    n_rows = rstd.numel()
    if n_rows == 0:
        return dx, torch.zeros_like(weight)
    launch = backward_launch(n_cols)
    # A pipelined config the device's shared memory cannot hold (more stages of wider rows, a third
    # input with the residual variant, a smaller GPU) is retried with fewer stages; what worked is
    # remembered for this (device, dtype, width, variant).
    fits_key = (x.device, x.dtype, launch, dsummed is not None)
    launch = dataclasses.replace(launch, num_stages=_stages_that_fit.get(fits_key, launch.num_stages))
    n_programs, rows_per_program = backward_grid(n_rows, launch, _sm_count(x.device))
    dw_partial = _new_output((n_programs, n_cols), torch.float32, x.device)
    dw = _new_output(weight.shape, weight.dtype, weight.device)
    dy_rows, x_rows, dx_rows = _as_rows(dy, n_cols), _as_rows(x, n_cols), dx.view(-1, n_cols)
    dsummed_rows = _as_rows(dsummed, n_cols) if dsummed is not None else dy_rows
    with _on_device(x):
        while True:
            try:
                _launch_backward(
                    (n_programs,), dy_rows, x_rows, weight.contiguous(), rstd.reshape(-1), dsummed_rows, dx_rows,
                    dw_partial, dy_rows.stride(0), x_rows.stride(0), dsummed_rows.stride(0), dx_rows.stride(0),
                    n_rows, n_cols, rows_per_program,
                    BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, HAS_DSUMMED=dsummed is not None,
                    NUM_STAGES=launch.num_stages, num_warps=launch.num_warps)
                break
            except _OUT_OF_RESOURCES:
                if launch.num_stages <= 1:
                    raise
                launch = dataclasses.replace(launch, num_stages=launch.num_stages - 1)
                _stages_that_fit[fits_key] = launch.num_stages
        # Partials are (SMs * k, N) fp32, a few MiB at most and still in L2: 32 columns x 64 partial
        # rows per step keeps each program's loads coalesced (128 B per row) and in flight.
        _sum_partials_kernel[(triton.cdiv(n_cols, 32),)](
            dw_partial, dw, n_programs, n_cols, BLOCK_P=64, BLOCK_C=32, num_warps=4)
    return dx, dw


# ------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("torchtitan_like::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, weight, eps)
    return y, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torchtitan_like::fused_add_rms_norm_fwd", mutates_args=())
def _fused_add_rms_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(x, residual, weight, eps)


@_fused_add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("torchtitan_like::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                     dsummed: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, x, weight, rstd, dsummed)


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, dsummed):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _rms_norm_setup_context(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.torchtitan_like.rms_norm_bwd(dy, x, weight, rstd, None)
    return dx, dw, None


def _fused_setup_context(ctx, inputs, output):
    _, _, weight, _ = inputs
    _, summed, rstd = output
    ctx.save_for_backward(summed, weight, rstd)  # x_hat is recomputed from summed, not from x


def _fused_backward(ctx, dnormed, dsummed, _drstd):
    summed, weight, rstd = ctx.saved_tensors
    dx, dw = torch.ops.torchtitan_like.rms_norm_bwd(dnormed, summed, weight, rstd, dsummed)
    return dx, dx, dw, None


_rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup_context)
_fused_add_rms_norm_fwd_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ------------------------------------------------------------------------------- public API
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim with the Triton kernels (differentiable, one compile node)."""
    return torch.ops.torchtitan_like.rms_norm_fwd(x, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory; both outputs differentiable."""
    normed, summed, _ = torch.ops.torchtitan_like.fused_add_rms_norm_fwd(x, residual, weight, eps)
    return normed, summed


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Plain PyTorch RMSNorm computed in fp32 and cast back to x's dtype (what the kernels match)."""
    x_fp32 = x.float()
    rstd = torch.rsqrt(x_fp32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x_fp32 * rstd * weight.float()).to(x.dtype)


def _dtensor_rms_norm(x, weight, eps: float):
    """RMSNorm of a DTensor sharded on a non-hidden dim (sequence parallel) with a replicated weight.

    Each rank normalizes its local rows. Its weight gradient covers only those rows, so the weight's
    local view declares a Partial gradient on every mesh dim where x is sharded (summed when the
    gradient is redistributed), and Replicate where x is replicated.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate

    if not (isinstance(x, DTensor) and isinstance(weight, DTensor)):
        raise TypeError("TritonRMSNorm: x and weight must both be DTensors or both plain tensors")
    if not all(p.is_replicate() for p in weight.placements):
        raise ValueError(f"TritonRMSNorm: weight must be replicated, got {weight.placements}")
    if any(p.is_partial() or p.is_shard(x.ndim - 1) or p.is_shard(-1) for p in x.placements):
        raise ValueError(f"TritonRMSNorm: x must not be partial or sharded on the hidden dim, got {x.placements}")
    grad_placements = [Partial() if p.is_shard() else Replicate() for p in x.placements]
    local_x = x.to_local()
    local_weight = weight.to_local(grad_placements=grad_placements)
    norm = rms_norm if triton_available_for(local_x) else rms_norm_reference
    local_y = norm(local_x, local_weight, eps)
    global_stride = torch.empty(x.shape, device="meta").stride()
    return DTensor.from_local(local_y, x.device_mesh, x.placements, run_check=False,
                              shape=x.shape, stride=global_stride)


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"


class TritonRMSNorm(nn.Module):
    """Drop-in for `torch.nn.RMSNorm(dim, eps)`: same `weight`, Triton kernels where they can run.

    Plain tensors use the kernels on CUDA (or CPU under TRITON_INTERPRET=1) and the fp32 reference
    elsewhere. A DTensor input sharded on a non-hidden dim (sequence parallel) with a replicated
    weight runs on the local shard; the output keeps x's placements and dtype.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(x) or _is_dtensor(self.weight):
            return _dtensor_rms_norm(x, self.weight, self.eps)
        if triton_available_for(x):
            return rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + update, self(x + update)): a pre-norm block's residual add and the next norm.

        One fused kernel pass on plain tensors; both are first promoted to their common dtype, as `x +
        update` would (bf16 sub-layer outputs into an fp32 residual stream under autocast; never a
        rounding of the wider one down to the other's dtype), so the sum is bit-equal. DTensors
        (sequence parallel) take the unfused path.
        """
        if _is_dtensor(x) or _is_dtensor(update) or _is_dtensor(self.weight) or not triton_available_for(x) \
                or update.shape != x.shape:
            summed = x + update
            return summed, self(summed)
        dtype = torch.promote_types(x.dtype, update.dtype)
        normed, summed = fused_add_rms_norm(x.to(dtype), update.to(dtype), self.weight, self.eps)
        return summed, normed

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"
