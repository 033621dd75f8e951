"""Float8 training linears (dynamic scaling, tensorwise and rowwise recipes).

quantize.py: fused amax + scale + cast kernels; gemm.py: fp8 GEMM with scales in the epilogue
(Triton, torch._scaled_mm, emulation); linear.py: Float8Linear and its autograd; fsdp.py: FSDP2
all-gather of weights in fp8 and precomputed scales; convert.py: the module swap from the [float8]
config and the device check.
"""

from torchtitan_like.kernels.float8.convert import check_float8_support, convert_to_float8, enable_float8_all_gather
from torchtitan_like.kernels.float8.fsdp import Float8AllGatherWeight, Float8GatheredWeight, precompute_float8_scales
from torchtitan_like.kernels.float8.gemm import fp8_gemm, resolve_backend, scaled_mm
from torchtitan_like.kernels.float8.linear import Float8Linear, float8_linear_reference, float8_mm
from torchtitan_like.kernels.float8.quantize import (
    colwise_quantize_t,
    rowwise_quantize,
    tensorwise_quantize,
)

__all__ = [
    "Float8AllGatherWeight", "Float8GatheredWeight", "Float8Linear", "check_float8_support", "colwise_quantize_t",
    "convert_to_float8", "enable_float8_all_gather", "float8_linear_reference", "float8_mm", "fp8_gemm",
    "precompute_float8_scales", "resolve_backend", "rowwise_quantize", "scaled_mm", "tensorwise_quantize",
]
