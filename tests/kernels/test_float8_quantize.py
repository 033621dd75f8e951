"""Float8 quantize kernels (kernels/float8/quantize.py) equal the torch reference cast bit for bit."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch

from torchtitan_like.kernels.float8 import quantize as q


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(q, "POISON_OUTPUTS", True)


def _bits(t):
    return t.view(torch.uint8)


def _hard_input(shape, dtype):
    """Fresh random values with a zero row, negatives, tiny values and one large outlier."""
    x = torch.randn(shape) * 3
    x[1] = 0.0
    x[0, : shape[1] // 2] *= 1e-3
    x[-1, -1] = -40.0
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("float8_dtype", [q.E4M3, q.E5M2])
@pytest.mark.parametrize("shape", [(37, 50), (16, 32)])
def test_tensorwise_cast_and_transpose_match_reference_bitwise(shape, float8_dtype, dtype):
    x = _hard_input(shape, dtype)
    out, out_t, scale = q.tensorwise_quantize(x, float8_dtype, "also")
    ref, ref_t, ref_scale = q.tensorwise_quantize_reference(x, float8_dtype)
    assert scale.shape == () and torch.equal(scale, ref_scale)
    assert torch.equal(_bits(out), _bits(ref))
    assert torch.equal(_bits(out_t), _bits(ref_t))
    assert not torch.isnan(out.float()).any()


def test_tensorwise_reuses_given_scale_for_transpose_only():
    x = _hard_input((21, 40), torch.bfloat16)
    scale = torch.tensor(3.5)
    out, out_t, same = q.tensorwise_quantize(x, q.E4M3, "only", scale=scale)
    assert out is None and same is scale
    assert torch.equal(_bits(out_t), _bits(q.to_float8_reference(x, scale, q.E4M3).t().contiguous()))


@pytest.mark.parametrize("float8_dtype", [q.E4M3, q.E5M2])
def test_saturation_and_rounding_exact_on_dense_grid(float8_dtype):
    # scale fixed at 1: a dense sweep across every binade, ties included, and past FP8_MAX.
    limit = q.fp8_max(float8_dtype) * 1.2
    x = torch.linspace(-limit, limit, 48 * 64).reshape(48, 64)
    x[0, :32] = torch.linspace(-0.02, 0.02, 32)  # subnormals of both formats
    scale = torch.tensor(1.0)
    _, out_t, _ = q.tensorwise_quantize(x, float8_dtype, "only", scale=scale)
    ref = q.to_float8_reference(x, scale, float8_dtype)
    assert torch.equal(_bits(out_t), _bits(ref.t().contiguous()))
    assert out_t.float().abs().max() == q.fp8_max(float8_dtype)


@pytest.mark.parametrize("float8_dtype", [q.E4M3, q.E5M2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_matches_reference_bitwise(float8_dtype, dtype):
    x = _hard_input((9, 70), dtype)
    out, scale = q.rowwise_quantize(x, float8_dtype)
    ref, ref_scale = q.rowwise_quantize_reference(x, float8_dtype)
    assert scale.shape == (9, 1) and torch.equal(scale, ref_scale)
    assert torch.equal(_bits(out), _bits(ref))


@pytest.mark.parametrize("float8_dtype", [q.E4M3, q.E5M2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_colwise_transposed_matches_reference_bitwise(float8_dtype, dtype):
    x = _hard_input((37, 45), dtype)
    x[:, 3] = 0.0  # an all-zero column: amax 0 -> scale FP8_MAX / EPS, values stay 0
    out_t, scale = q.colwise_quantize_t(x, float8_dtype)
    ref_t, ref_scale = q.colwise_quantize_t_reference(x, float8_dtype)
    assert out_t.shape == (45, 37) and out_t.is_contiguous()
    assert scale.shape == (45, 1) and torch.equal(scale, ref_scale)
    assert torch.equal(_bits(out_t), _bits(ref_t))
    assert torch.isfinite(scale).all()


@pytest.mark.parametrize("float8_dtype", [q.E4M3, q.E5M2])
def test_nan_and_inf_inputs_propagate_nan_like_the_reference(float8_dtype):
    # A NaN must not vanish: its amax (and so its scale) is NaN and its values cast to NaN, as in
    # torch. An inf gives scale 0, and inf * 0 is NaN. Triton's default max/clamp drop NaNs, which
    # cast a NaN row to finite values (-FP8_MAX) with a finite scale.
    x = torch.randn(6, 20)
    x[1, 3] = float("nan")
    x[4, 7] = float("inf")

    def same(out, ref):  # NaNs in the same places, every other value bit-equal
        nan = ref.float().isnan()
        return torch.equal(out.float().isnan(), nan) and torch.equal(out.float()[~nan], ref.float()[~nan])

    out, scale = q.rowwise_quantize(x, float8_dtype)
    ref, ref_scale = q.rowwise_quantize_reference(x, float8_dtype)
    assert same(scale, ref_scale) and scale[1].isnan()
    assert same(out, ref) and out[1].float().isnan().all() and out[4, 7].float().isnan()
    out_t, scale = q.colwise_quantize_t(x, float8_dtype)
    ref_t, ref_scale = q.colwise_quantize_t_reference(x, float8_dtype)
    assert same(scale, ref_scale) and same(out_t, ref_t)
    out, out_t, scale = q.tensorwise_quantize(x, float8_dtype, "also")
    assert scale.isnan() and out.float().isnan().all() and out_t.float().isnan().all()


@pytest.mark.parametrize("transpose", ["no", "also", "only"])
def test_cast_custom_ops_equal_the_kernels_and_pass_opcheck(transpose):
    # cast_ops.py wraps the kernels as torch.library ops (one compile node each, merged by CSE);
    # opcheck runs them through fake tensors and AOTAutograd, so a wrong fake shape fails here.
    from torchtitan_like.kernels.float8 import cast_ops

    x = _hard_input((24, 40), torch.bfloat16)
    given_scale = torch.tensor(3.5)
    pairs = [
        (cast_ops.tensorwise_quantize(x, q.E4M3, transpose), q.tensorwise_quantize(x, q.E4M3, transpose)),
        (cast_ops.tensorwise_quantize(x, q.E5M2, transpose, scale=given_scale),
         q.tensorwise_quantize(x, q.E5M2, transpose, scale=given_scale)),
        (cast_ops.rowwise_quantize(x, q.E4M3), q.rowwise_quantize(x, q.E4M3)),
        (cast_ops.colwise_quantize_t(x, q.E4M3), q.colwise_quantize_t(x, q.E4M3)),
    ]
    for ours, kernel in pairs:
        assert len(ours) == len(kernel)
        for a, b in zip(ours, kernel):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.shape == b.shape and a.dtype == b.dtype
                assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                   b.view(torch.uint8) if b.element_size() == 1 else b)
    torch.library.opcheck(torch.ops.torchtitan_like.fp8_tensorwise_cast.default, (x, q.E4M3, transpose))
    torch.library.opcheck(torch.ops.torchtitan_like.fp8_tensorwise_cast_scaled.default,
                          (x, given_scale, q.E5M2, transpose))
    if transpose == "no":
        torch.library.opcheck(torch.ops.torchtitan_like.fp8_rowwise_cast.default, (x, q.E4M3))
        torch.library.opcheck(torch.ops.torchtitan_like.fp8_colwise_cast_t.default, (x, q.E4M3))
    with pytest.raises(ValueError, match="transpose must be"):
        cast_ops.tensorwise_quantize(x, q.E4M3, "sideways")
