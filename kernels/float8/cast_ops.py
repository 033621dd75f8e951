"""The fp8 cast kernels of quantize.py as torch.library custom ops: what Float8Linear calls.

Why operators and not the raw kernel launches: torch.compile then sees each cast as one functional
node, and AOTAutograd's common-subexpression pass (run by Inductor's partitioner) merges identical
nodes. Llama's q/k/v projections read the same normed input, and so do the FFN's w1 and w3, so
under compile that input is cast once for all three (and two) Float8Linears instead of once per
linear, and one fp8 transposed copy of it is saved for their weight gradients instead of three.
Raw launches cannot merge: each writes into its own freshly allocated buffer, and allocations are
never merged. On the 8-layer 8B shape (M = 8192) that is 3 of the 7 activation casts per layer,
about 0.6 GiB of memory traffic per layer and 96 MiB of saved activations. Eager mode runs each
cast as before.

Custom ops cannot return None, so the tensorwise op returns a list: [x_fp8] or [x_fp8^T] or both,
then the scale; `tensorwise_quantize` below restores quantize.py's (x_fp8 | None, x_fp8^T | None,
scale) triple. An op output may not alias an input, so a cast with a given scale is its own op
that returns only the fp8 data.
"""

import torch

from torchtitan_like.kernels.float8 import quantize as q


def _split(transpose: str, data: list[torch.Tensor]):
    """The op's list -> (x_fp8 | None, x_fp8^T | None)."""
    if transpose == "also":
        return data[0], data[1]
    return (data[0], None) if transpose == "no" else (None, data[0])


@torch.library.custom_op("torchtitan_like::fp8_tensorwise_cast", mutates_args=())
def _tensorwise_cast(x: torch.Tensor, float8_dtype: torch.dtype, transpose: str) -> list[torch.Tensor]:
    data, data_t, scale = q.tensorwise_quantize(x, float8_dtype, transpose)
    return [t for t in (data, data_t) if t is not None] + [scale]


@torch.library.custom_op("torchtitan_like::fp8_tensorwise_cast_scaled", mutates_args=())
def _tensorwise_cast_scaled(x: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype,
                            transpose: str) -> list[torch.Tensor]:
    data, data_t, _ = q.tensorwise_quantize(x, float8_dtype, transpose, scale=scale)
    return [t for t in (data, data_t) if t is not None]


@torch.library.custom_op("torchtitan_like::fp8_rowwise_cast", mutates_args=())
def _rowwise_cast(x: torch.Tensor, float8_dtype: torch.dtype) -> list[torch.Tensor]:
    return list(q.rowwise_quantize(x, float8_dtype))


@torch.library.custom_op("torchtitan_like::fp8_colwise_cast_t", mutates_args=())
def _colwise_cast_t(x: torch.Tensor, float8_dtype: torch.dtype) -> list[torch.Tensor]:
    return list(q.colwise_quantize_t(x, float8_dtype))


def _fake_data(x: torch.Tensor, float8_dtype: torch.dtype, transpose: str) -> list[torch.Tensor]:
    rows, cols = x.shape
    data = [] if transpose == "only" else [x.new_empty((rows, cols), dtype=float8_dtype)]
    return data + ([] if transpose == "no" else [x.new_empty((cols, rows), dtype=float8_dtype)])


@_tensorwise_cast.register_fake
def _(x, float8_dtype, transpose):
    return _fake_data(x, float8_dtype, transpose) + [x.new_empty((), dtype=torch.float32)]


@_tensorwise_cast_scaled.register_fake
def _(x, scale, float8_dtype, transpose):
    return _fake_data(x, float8_dtype, transpose)


@_rowwise_cast.register_fake
def _(x, float8_dtype):
    return [x.new_empty(x.shape, dtype=float8_dtype), x.new_empty((x.shape[0], 1), dtype=torch.float32)]


@_colwise_cast_t.register_fake
def _(x, float8_dtype):
    rows, cols = x.shape
    return [x.new_empty((cols, rows), dtype=float8_dtype), x.new_empty((cols, 1), dtype=torch.float32)]


def _check(x: torch.Tensor, transpose: str | None = None) -> torch.Tensor:
    """quantize.py's argument checks, made before the op so its errors are the same."""
    if transpose is not None and transpose not in ("no", "also", "only"):
        raise ValueError(f"transpose must be 'no', 'also' or 'only', got {transpose!r}")
    if x.dim() != 2:
        raise ValueError(f"float8 quantize expects a 2D tensor, got shape {tuple(x.shape)}")
    return x if x.is_contiguous() else x.contiguous()


def tensorwise_quantize(x: torch.Tensor, float8_dtype: torch.dtype, transpose: str = "no",
                        scale: torch.Tensor | None = None):
    """quantize.tensorwise_quantize through the custom ops (same results, bit for bit)."""
    x = _check(x, transpose)
    if scale is None:
        *data, scale = _tensorwise_cast(x, float8_dtype, transpose)
        return (*_split(transpose, data), scale)
    return (*_split(transpose, _tensorwise_cast_scaled(x, scale, float8_dtype, transpose)), scale)


def rowwise_quantize(x: torch.Tensor, float8_dtype: torch.dtype):
    """quantize.rowwise_quantize through its custom op: (x_fp8 (R, C), scale (R, 1))."""
    data, scale = _rowwise_cast(_check(x), float8_dtype)
    return data, scale


def colwise_quantize_t(x: torch.Tensor, float8_dtype: torch.dtype):
    """quantize.colwise_quantize_t through its custom op: (x^T fp8 (C, R), scale (C, 1))."""
    data_t, scale = _colwise_cast_t(_check(x), float8_dtype)
    return data_t, scale
