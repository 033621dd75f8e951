"""Triton FP8 GEMM (kernels/float8/gemm.py) against the fp64 product of the dequantized operands.

Tolerance: the kernel accumulates exact fp8 products in fp32, so against fp64 the error is fp32
summation error (~1e-6 relative) plus the output rounding: 1e-5 relative for fp32 output, one bf16
ulp (2^-7 relative to the largest |C|) for bf16 output: a GPU rounds to nearest (half an ulp), the
Triton interpreter truncates (up to one ulp).
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

from dataclasses import replace

import pytest
import torch

from torchtitan_like.kernels.float8 import gemm as g
from torchtitan_like.kernels.float8 import gemm_configs as gc
from torchtitan_like.kernels.float8 import quantize as q

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(q, "POISON_OUTPUTS", True)


def _operands(M, K, N, recipe, a_dtype=q.E4M3, b_dtype=q.E4M3):
    """a (M, K) row-major, b (K, N) column-major, and dequantization scales."""
    x, w = torch.randn(M, K) * 2, torch.randn(N, K) * 0.05
    if recipe == "tensorwise":
        a, _, sa = q.tensorwise_quantize_reference(x, a_dtype)
        bt, _, sb = q.tensorwise_quantize_reference(w, b_dtype)
        return a, bt.t(), sa.reciprocal(), sb.reciprocal()
    a, sa = q.rowwise_quantize_reference(x, a_dtype)
    bt, sb = q.rowwise_quantize_reference(w, b_dtype)
    return a, bt.t(), sa.reciprocal(), sb.reciprocal().t()


def _assert_close(c, ref, out_dtype):
    assert c.dtype == out_dtype and not torch.isnan(c).any()
    error = (c.double() - ref).abs().max().item()
    assert error <= TOLERANCE[out_dtype] * ref.abs().max().item(), error


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("shape", [(33, 70, 45), (32, 64, 48)])
def test_fp8_gemm_matches_dequantized_reference(shape, recipe, out_dtype):
    a, b, sa, sb = _operands(*shape, recipe)
    c = g.fp8_gemm(a, b, sa, sb, out_dtype)
    _assert_close(c, g.scaled_mm_reference(a, b, sa, sb), out_dtype)


TMA_CONFIGS = [gc.INTERPRETER_TMA_CONFIG, replace(gc.INTERPRETER_TMA_CONFIG, tma_store=True),
               replace(gc.INTERPRETER_TMA_CONFIG, flatten=False)]


@pytest.mark.parametrize("config", TMA_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("shape", [(33, 48, 45), (64, 96, 40)])  # K tail of 16 (zero-filled), M and N tails
def test_persistent_tma_kernel_matches_dequantized_reference(shape, recipe, out_dtype, config):
    a, b, sa, sb = _operands(*shape, recipe)
    for fast in (False, True):
        c = g.fp8_gemm(a, b, sa, sb, out_dtype, use_fast_accum=fast, config=config)
        _assert_close(c, g.scaled_mm_reference(a, b, sa, sb), out_dtype)


def test_tma_config_falls_back_to_pointer_kernel_when_rows_are_unaligned():
    a, b, sa, sb = _operands(24, 70, 20, "tensorwise")  # K % 16 != 0: no TMA descriptor
    c = g.fp8_gemm(a, b, sa, sb, torch.float32, config=gc.INTERPRETER_TMA_CONFIG)
    _assert_close(c, g.scaled_mm_reference(a, b, sa, sb), torch.float32)
    out = torch.full((20, 24), float("nan")).t()  # column-major C: no vector stores along N either
    a, b, sa, sb = _operands(24, 64, 20, "rowwise")
    g.fp8_gemm(a, b, sa, sb, torch.float32, out=out, config=gc.INTERPRETER_TMA_CONFIG)
    _assert_close(out, g.scaled_mm_reference(a, b, sa, sb), torch.float32)


def test_sweep_lists_at_most_eight_configs_led_by_the_default():
    for fast, default in ((True, gc.FAST_CONFIG), (False, gc.PRECISE_CONFIG)):
        configs = gc.sweep_configs(fast)
        assert configs[0] == default and len(configs) <= 8 and len(set(configs)) == len(configs)
        for c in configs:  # pipelined A and B stages (+ a bf16 C tile for a TMA store) fit sm_90's 227 KiB
            smem = c.num_stages * (c.block_m + c.block_n) * c.block_k + c.tma_store * c.block_m * c.block_n * 2
            assert smem <= 227 * 1024, c.name


def test_fp8_gemm_mixed_e5m2_e4m3_with_fast_accum():
    a, b, sa, sb = _operands(40, 96, 24, "tensorwise", a_dtype=q.E5M2)
    c = g.fp8_gemm(a, b, sa, sb, torch.float32, use_fast_accum=True)
    _assert_close(c, g.scaled_mm_reference(a, b, sa, sb), torch.float32)


def test_fp8_gemm_writes_into_strided_out():
    a, b, sa, sb = _operands(20, 32, 18, "rowwise")
    out = torch.full((18, 20), float("nan")).t()  # column-major destination
    g.fp8_gemm(a, b, sa, sb, torch.float32, out=out)
    _assert_close(out, g.scaled_mm_reference(a, b, sa, sb), torch.float32)


def test_emulated_backend_matches_reference():
    a, b, sa, sb = _operands(17, 48, 30, "rowwise")
    c = g.scaled_mm(a, b, sa, sb, torch.float32, backend="emulate")
    _assert_close(c, g.scaled_mm_reference(a, b, sa, sb), torch.float32)


def test_rowwise_scales_with_wrong_shape_are_rejected():
    a, b, sa, sb = _operands(16, 32, 16, "rowwise")
    with pytest.raises(ValueError, match="rowwise scales"):
        g.fp8_gemm(a, b, sa.t(), sb, torch.float32)


def test_resolve_backend_on_cpu():
    cpu = torch.device("cpu")
    assert g.resolve_backend("auto", cpu, emulate=True) == "emulate"
    assert g.resolve_backend("auto", cpu, emulate=False) == "triton"  # TRITON_INTERPRET=1 here
    assert g.resolve_backend("torch", cpu, emulate=False) == "torch"
    with pytest.raises(ValueError):
        g.resolve_backend("cublas", cpu, emulate=False)
