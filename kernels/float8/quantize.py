"""Fused amax + scale + cast to float8 (dynamic scaling), in Triton, with the plain-torch reference.

Math (the same for every recipe; only the set of elements an amax runs over changes):

    amax  = max |x|                             over the tensor, a row, or a column
    scale = FP8_MAX / max(amax, EPS)            fp32; EPS = 1e-12 keeps all-zero inputs finite
    x_fp8 = cast_rne(clamp(fp32(x) * scale, -FP8_MAX, FP8_MAX))
    x    ~= fp32(x_fp8) / scale                 (the GEMM epilogue multiplies by 1 / scale)

FP8_MAX is 448 for e4m3fn and 57344 for e5m2 (the largest finite value), so the largest |x| lands
exactly on FP8_MAX and nothing overflows; the clamp only matters for rounding of fp32(x) * scale.
NaNs propagate as in torch: a NaN makes its amax and scale NaN and its values NaN (an inf gives scale
0 and inf * 0 = NaN), so a diverging tensor is not cast to finite fp8 values.
The cast rounds to nearest even, exactly as `torch.Tensor.to(float8)` does, so the Triton kernels
equal the reference bit for bit (the scale is an IEEE-rounded division, `tl.math.div_rn`, not
Triton's default approximate one).

Kernels:
- tensorwise: `_block_amax_kernel` writes one partial amax per tile (no atomics, deterministic),
  torch reduces the partials, then `_scale_cast_kernel` computes the scale and writes the fp8
  copy and/or its transpose in one pass (the backward needs x^T and grad^T; fusing cast and
  transpose saves a read and a write of the high-precision tensor).
- rowwise: `_rowwise_kernel`, one program per row: amax over the row, scale, cast.
- columnwise (amax per column, output written transposed, the layout the next GEMM reads):
  `_block_amax_kernel` with PER_COLUMN partials, then `_scale_cast_kernel` in column mode.

Set `POISON_OUTPUTS = True` (tests do) to fill every new output with NaN bytes before a kernel runs,
so an element a kernel forgets to write cannot pass a comparison by luck.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with Linux torch wheels
    triton = None

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
EPS = 1e-12
POISON_OUTPUTS = False
# 0x7F is NaN in both e4m3fn and e5m2; the float poison is NaN.
_FP8_POISON_BYTE = 0x7F


def fp8_max(float8_dtype: torch.dtype) -> float:
    return float(torch.finfo(float8_dtype).max)


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or anywhere under the interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty, or NaN-poisoned when POISON_OUTPUTS is set (shared with gemm.py)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON_OUTPUTS:
        if dtype in (E4M3, E5M2):
            out.view(torch.uint8).fill_(_FP8_POISON_BYTE)
        else:
            out.fill_(float("nan"))
    return out


# ----------------------------------------------------------------------------- reference


def amax_to_scale_reference(amax: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    # A tensor numerator: `python_float / tensor` is computed as reciprocal-then-multiply (two roundings).
    numerator = torch.full((), fp8_max(float8_dtype), dtype=torch.float32, device=amax.device)
    return numerator / torch.clamp(amax.float(), min=EPS)


def to_float8_reference(x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype) -> torch.Tensor:
    max_value = fp8_max(float8_dtype)
    return (x.float() * scale).clamp(-max_value, max_value).to(float8_dtype)


def tensorwise_quantize_reference(x: torch.Tensor, float8_dtype: torch.dtype, scale: torch.Tensor | None = None):
    """(x_fp8, x_fp8^T contiguous, scale shape ()) with one scale for the whole tensor."""
    if scale is None:
        scale = amax_to_scale_reference(x.abs().amax(), float8_dtype)
    data = to_float8_reference(x, scale, float8_dtype)
    return data, data.t().contiguous(), scale


def tensorwise_quantize_reference_t(x, float8_dtype, transpose="also", scale=None):
    """Reference with tensorwise_quantize's signature (emulated Float8Linear uses it)."""
    data, data_t, scale = tensorwise_quantize_reference(x, float8_dtype, scale)
    return (None if transpose == "only" else data), (None if transpose == "no" else data_t), scale


def rowwise_quantize_reference(x: torch.Tensor, float8_dtype: torch.dtype):
    """(x_fp8 (R, C), scale (R, 1)): amax over each row."""
    scale = amax_to_scale_reference(x.abs().amax(dim=1, keepdim=True), float8_dtype)
    return to_float8_reference(x, scale, float8_dtype), scale


def colwise_quantize_t_reference(x: torch.Tensor, float8_dtype: torch.dtype):
    """(x^T in fp8 (C, R) contiguous, scale (C, 1)): amax over each column of x, i.e. each row of x^T."""
    return rowwise_quantize_reference(x.t(), float8_dtype)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _to_fp8(y, FP8_MAX: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr, out_dtype: tl.constexpr):
        """clamp then round-to-nearest-even cast. The GPU cast instruction (cvt.rn.satfinite) is exact
        RNE; the Triton interpreter's fp32->fp8 converter drops the carry when rounding crosses a power
        of two (-125.6 -> -64), so under the interpreter the value is first rounded onto the fp8 grid in
        fp32 arithmetic ((|y| + C) - C with C = 1.5 * 2^23 * ulp, an exact RNE) and then cast exactly."""
        # NaN-propagating clamp, as torch.clamp: Triton's default min/max return the non-NaN operand,
        # which turned a NaN (or inf * 0) into -FP8_MAX and hid it
        y = tl.clamp(y, -FP8_MAX, FP8_MAX, propagate_nan=tl.PropagateNan.ALL)
        if SOFTWARE_ROUNDING:
            # e4m3fn: 3 mantissa bits, smallest normal 2^-6; e5m2: 2 bits, 2^-14.
            MANTISSA_BITS: tl.constexpr = 3 if FP8_MAX == 448.0 else 2
            MIN_NORMAL_EXP: tl.constexpr = 127 - 6 if FP8_MAX == 448.0 else 127 - 14
            bits = y.to(tl.int32, bitcast=True)
            exponent = tl.maximum((bits >> 23) & 0xFF, MIN_NORMAL_EXP)
            magic = (((exponent - MANTISSA_BITS + 23) << 23) | 0x400000).to(tl.float32, bitcast=True)
            rounded = (tl.abs(y) + magic) - magic
            y = tl.where(bits < 0, -rounded, rounded)
            # the interpreter's converter also turns NaN into a finite value: write NaN (0x7F with
            # y's sign, as torch and the GPU's cvt) by its bits
            nan_bits = ((bits >> 24) & 0x80 | 0x7F).to(tl.uint8).to(out_dtype, bitcast=True)
            return tl.where(y == y, y.to(out_dtype, fp_downcast_rounding="rtne"), nan_bits)
        return y.to(out_dtype, fp_downcast_rounding="rtne")

    @triton.jit
    def _max_propagating_nan(a, b):
        """max that returns NaN if either is NaN, as torch.amax and torch.clamp (tl.maximum does not)."""
        return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _amax(abs_x, axis):
        """max over `axis` that returns NaN when any element is NaN, as torch.amax (tl.max skips NaNs,
        so a NaN input got a finite scale and was cast to -FP8_MAX)."""
        return tl.reduce(abs_x, axis, _max_propagating_nan)

    @triton.jit
    def _block_amax_kernel(x_ptr, partial_ptr, n_rows, n_cols, stride_x,
                           PER_COLUMN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        abs_x = tl.abs(x.to(tl.float32))
        if PER_COLUMN:  # partial_ptr is (row blocks, n_cols)
            tl.store(partial_ptr + pid_r * n_cols + cols, _amax(abs_x, 0), mask=cols < n_cols)
        else:  # partial_ptr is (row blocks, column blocks)
            tl.store(partial_ptr + pid_r * tl.num_programs(1) + pid_c, _amax(_amax(abs_x, 1), 0))

    @triton.jit
    def _scale_cast_kernel(x_ptr, amax_ptr, scale_ptr, out_ptr, out_t_ptr, n_rows, n_cols,
                           stride_x, stride_out, stride_out_t, FP8_MAX: tl.constexpr, EPS_: tl.constexpr,
                           PER_COLUMN: tl.constexpr, FROM_AMAX: tl.constexpr,
                           WRITE_OUT: tl.constexpr, WRITE_T: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_r = tl.program_id(0)
        pid_c = tl.program_id(1)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_in = rows < n_rows
        col_in = cols < n_cols
        mask = row_in[:, None] & col_in[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        if PER_COLUMN:
            amax = tl.load(amax_ptr + cols, mask=col_in, other=1.0)
            scale = tl.math.div_rn(tl.full([BLOCK_C], FP8_MAX, tl.float32), _max_propagating_nan(amax, EPS_))
            if pid_r == 0:
                tl.store(scale_ptr + cols, scale, mask=col_in)
            y = x.to(tl.float32) * scale[None, :]
        else:
            if FROM_AMAX:
                amax = tl.load(amax_ptr + tl.arange(0, 1))
                scale = tl.math.div_rn(tl.full([1], FP8_MAX, tl.float32), _max_propagating_nan(amax, EPS_))
                if (pid_r == 0) & (pid_c == 0):
                    tl.store(scale_ptr + tl.arange(0, 1), scale)
            else:
                scale = tl.load(scale_ptr + tl.arange(0, 1))
            y = x.to(tl.float32) * scale[:, None]
        y = _to_fp8(y, FP8_MAX, SOFTWARE_ROUNDING, out_ptr.dtype.element_ty)
        if WRITE_OUT:
            tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :], y, mask=mask)
        if WRITE_T:  # out_t[c, r] = y[r, c]; Triton stages the transpose through shared memory
            tl.store(out_t_ptr + cols[:, None].to(tl.int64) * stride_out_t + rows[None, :], tl.trans(y),
                     mask=col_in[:, None] & row_in[None, :])

    @triton.jit
    def _rowwise_kernel(x_ptr, out_ptr, scale_ptr, n_cols, stride_x, stride_out,
                        FP8_MAX: tl.constexpr, EPS_: tl.constexpr, SOFTWARE_ROUNDING: tl.constexpr,
                        BLOCK_C: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        running = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0)
            running = _max_propagating_nan(running, tl.abs(x.to(tl.float32)))
        amax = _amax(running, 0)
        amax_vec = tl.zeros([1], dtype=tl.float32) + amax
        scale = tl.math.div_rn(tl.full([1], FP8_MAX, tl.float32), _max_propagating_nan(amax_vec, EPS_))
        tl.store(scale_ptr + row + tl.arange(0, 1), scale)
        # Second pass re-reads the row; it is hot in L2 (<= 64 KiB for Llama rows).
        for start in range(0, n_cols, BLOCK_C):
            cols = start + tl.arange(0, BLOCK_C)
            x = tl.load(x_row + cols, mask=cols < n_cols, other=0.0)
            y = x.to(tl.float32)[None, :] * scale[:, None]
            y = _to_fp8(y, FP8_MAX, SOFTWARE_ROUNDING, out_ptr.dtype.element_ty)
            tl.store(out_ptr + row * stride_out + cols[None, :], y, mask=(cols < n_cols)[None, :])


def _software_rounding(device: torch.device) -> bool:
    return device.type != "cuda"  # only the interpreter runs Triton off-GPU


def _tile_sizes(device: torch.device) -> tuple[int, int]:
    # 64 x 128 tiles: 16 KiB of bf16 per program on a GPU; small tiles keep the interpreter fast.
    return (64, 128) if device.type == "cuda" else (16, 32)


def _as_2d_contiguous(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"float8 quantize expects a 2D tensor, got shape {tuple(x.shape)}")
    return x if x.is_contiguous() else x.contiguous()


def _amax_partials(x: torch.Tensor, per_column: bool) -> torch.Tensor:
    n_rows, n_cols = x.shape
    block_r, block_c = _tile_sizes(x.device)
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    width = n_cols if per_column else grid[1]
    partials = new_output((grid[0], width), torch.float32, x.device)
    _block_amax_kernel[grid](x, partials, n_rows, n_cols, x.stride(0),
                             PER_COLUMN=per_column, BLOCK_R=block_r, BLOCK_C=block_c)
    return partials


def _scale_cast(x, float8_dtype, amax, scale, per_column, write_out, write_t):
    n_rows, n_cols = x.shape
    block_r, block_c = _tile_sizes(x.device)
    out = new_output((n_rows, n_cols), float8_dtype, x.device) if write_out else None
    out_t = new_output((n_cols, n_rows), float8_dtype, x.device) if write_t else None
    any_out = out if out is not None else out_t
    grid = (triton.cdiv(n_rows, block_r), triton.cdiv(n_cols, block_c))
    _scale_cast_kernel[grid](
        x, amax if amax is not None else scale, scale, any_out, out_t if out_t is not None else any_out,
        n_rows, n_cols, x.stride(0), n_cols, n_rows, FP8_MAX=fp8_max(float8_dtype), EPS_=EPS,
        PER_COLUMN=per_column, FROM_AMAX=amax is not None, WRITE_OUT=write_out, WRITE_T=write_t,
        SOFTWARE_ROUNDING=_software_rounding(x.device),
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=8 if x.device.type == "cuda" else 1)
    return out, out_t


def tensorwise_quantize(x: torch.Tensor, float8_dtype: torch.dtype, transpose: str = "no",
                        scale: torch.Tensor | None = None):
    """One scale for the whole 2D tensor -> (x_fp8 or None, x_fp8^T or None, scale shape ()).

    transpose: "no" (only x_fp8), "also" (both, one pass), "only" (only the transpose).
    scale: reuse a scale computed earlier (the backward re-casts the weight with its forward scale)
    instead of computing amax.
    """
    if transpose not in ("no", "also", "only"):
        raise ValueError(f"transpose must be 'no', 'also' or 'only', got {transpose!r}")
    x = _as_2d_contiguous(x)
    amax = None
    if scale is None:
        amax = _amax_partials(x, per_column=False).amax().reshape(1)
        scale = new_output((), torch.float32, x.device)
    out, out_t = _scale_cast(x, float8_dtype, amax, scale.reshape(1) if amax is None else scale,
                             per_column=False, write_out=transpose != "only", write_t=transpose != "no")
    return out, out_t, scale


def rowwise_quantize(x: torch.Tensor, float8_dtype: torch.dtype):
    """One scale per row (amax over the columns) -> (x_fp8 (R, C), scale (R, 1))."""
    x = _as_2d_contiguous(x)
    n_rows, n_cols = x.shape
    out = new_output((n_rows, n_cols), float8_dtype, x.device)
    scale = new_output((n_rows, 1), torch.float32, x.device)
    block_c = min(2048 if x.device.type == "cuda" else 64, triton.next_power_of_2(max(n_cols, 1)))
    _rowwise_kernel[(n_rows,)](x, out, scale, n_cols, x.stride(0), n_cols, FP8_MAX=fp8_max(float8_dtype),
                               EPS_=EPS, SOFTWARE_ROUNDING=_software_rounding(x.device), BLOCK_C=block_c, num_warps=8 if x.device.type == "cuda" else 1)
    return out, scale


def colwise_quantize_t(x: torch.Tensor, float8_dtype: torch.dtype):
    """One scale per column (amax over the rows), written transposed -> (x^T fp8 (C, R), scale (C, 1))."""
    x = _as_2d_contiguous(x)
    amax = _amax_partials(x, per_column=True).amax(dim=0)
    scale = new_output((x.shape[1], 1), torch.float32, x.device)
    _, out_t = _scale_cast(x, float8_dtype, amax, scale, per_column=True, write_out=False, write_t=True)
    return out_t, scale
