"""Fused RMSNorm kernels (kernels/rmsnorm.py) under the Triton interpreter, against a float64 reference.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET is set before
anything imports triton or the kernels. Every test runs with poisoned outputs (NaN-filled before the
kernels write them) and fresh random inputs.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torchtitan_like.kernels import rmsnorm  # noqa: E402
from torchtitan_like.kernels.rmsnorm import (  # noqa: E402
    TritonRMSNorm, fused_add_rms_norm, rms_norm, rms_norm_reference, triton_available_for)
from torchtitan_like.kernels.rmsnorm_launch import (  # noqa: E402
    ENV_VAR, BackwardLaunch, ForwardLaunch, backward_grid, backward_launch, forward_launch, launch_overrides)

# |actual - expected| <= RTOL * |expected| + ATOL * scale, against float64 math on the same (already
# rounded) inputs; scale is the magnitude of the terms that cancel (max |y|, max rstd*|dy*w| for dx,
# max column sum of |dy * x_hat| for dweight). fp32: accumulation-order noise; bf16 / fp16: one
# rounding of the output (unit roundoff 2^-8 and 2^-11), plus that of the fused residual sum.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2), torch.float16: (2e-3, 2e-3)}
EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(rmsnorm, "_POISON_OUTPUTS", True)


def assert_matches(actual, expected, dtype, what, scale=None):
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite elements (an output left unwritten?)"
    rtol, atol = TOLERANCES[dtype]
    expected = expected.double()
    scale = expected.abs().max() if scale is None else scale
    error = (actual.double() - expected).abs()
    bound = rtol * expected.abs() + atol * max(float(scale), 1e-12)
    assert (error <= bound).all(), f"{what}: max error {error.max().item():.3g}, bound {bound.max().item():.3g}"


def random_weight(n, dtype):
    return (1.0 + 0.5 * torch.randn(n)).to(dtype).requires_grad_()


def reference_float64(x, weight, dy):
    """(y, dx, dw, scale of dx, scale of dw) from float64 autograd through rms_norm_reference."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    y64 = rms_norm_reference(x64, w64, EPS)
    y64.backward(dy.double())
    rstd = torch.rsqrt(x64.detach().square().mean(-1, keepdim=True) + EPS)
    dx_scale = (rstd * (dy.double() * w64.detach()).abs()).max()
    dw_scale = (dy.double() * x64.detach() * rstd).abs().reshape(-1, x.shape[-1]).sum(0).max()
    return y64.detach(), x64.grad, w64.grad, dx_scale, dw_scale


def assert_forward_backward_match_reference(x, weight, leaf=None):
    """Run the kernel path on x (a leaf or a view of `leaf`) and compare y, dx, dw in x's dtype."""
    dtype = x.dtype
    y = rms_norm(x, weight, EPS)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, dx_scale, dw_scale = reference_float64(x, weight, dy)
    dx = leaf.grad[tuple(slice(0, s) for s in x.shape)] if leaf is not None else x.grad
    assert_matches(y, y_ref, dtype, "y")
    assert_matches(dx, dx_ref, dtype, "dx", dx_scale)
    assert_matches(weight.grad, dw_ref, dtype, "dweight", dw_scale)


def test_kernels_run_under_the_triton_interpreter():
    assert rmsnorm._kernels_interpreted(), "rmsnorm was imported before TRITON_INTERPRET=1 was set"
    assert triton_available_for(torch.zeros(2, 8))
    assert torch.isnan(rmsnorm._new_output((3,), torch.float32, torch.device("cpu"))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden", [1, 7, 33, 100, 257, 1000])
def test_forward_and_gradients_match_float64_reference(dtype, hidden):
    x = torch.randn(2, 3, hidden, dtype=dtype, requires_grad=True)
    assert_forward_backward_match_reference(x, random_weight(hidden, dtype))


@pytest.mark.parametrize("rows, hidden", [(52, 33), (16, 1000), (2, 4000)])
def test_many_row_blocks_per_program_and_wide_rows_match_reference(rows, hidden):
    # Tiles of 4 rows over 3 backward programs (the interpreter's "SMs"): 52 rows are 13 tiles, 5 per
    # program with a ragged last program, so a program loops and sums dweight over tiles; 4000 is near 4096.
    x = torch.randn(rows, hidden, dtype=torch.bfloat16, requires_grad=True)
    with launch_overrides(fwd_block_m=4, bwd_block_m=4, bwd_programs_per_sm=1):
        assert_forward_backward_match_reference(x, random_weight(hidden, torch.bfloat16))


def test_backward_grid_is_one_wave_of_whole_tiles_covering_every_row():
    launch = backward_launch(4096)
    for rows in (1, 7, 263, 264, 265, 16384, 100_003):
        programs, rows_per_program = backward_grid(rows, launch, 132)
        assert rows_per_program % launch.block_m == 0
        assert programs <= 132 * launch.programs_per_sm
        assert (programs - 1) * rows_per_program < rows <= programs * rows_per_program


def test_backward_retries_with_fewer_stages_when_shared_memory_is_too_small(monkeypatch):
    # On the H200 the 3-stage backward of the residual variant at hidden 16384 asked for 262,216 bytes
    # of shared memory (limit 232,448) and failed at launch. The interpreter has no such limit: a
    # launcher that refuses more than one stage stands in for the small device.
    from triton.runtime.errors import OutOfResources

    real_launch, attempts = rmsnorm._launch_backward, []

    def small_device(grid, *args, **meta):
        attempts.append(meta["NUM_STAGES"])
        if meta["NUM_STAGES"] > 1:
            raise OutOfResources(meta["NUM_STAGES"] * 98_304, 232_448, "shared memory")
        real_launch(grid, *args, **meta)

    monkeypatch.setattr(rmsnorm, "_launch_backward", small_device)
    monkeypatch.setattr(rmsnorm, "_stages_that_fit", {})
    x = torch.randn(6, 100, dtype=torch.bfloat16, requires_grad=True)
    with launch_overrides(bwd_stages=3):
        assert_forward_backward_match_reference(x, random_weight(100, torch.bfloat16))
        assert attempts == [3, 2, 1]
        attempts.clear()
        assert_forward_backward_match_reference(x.detach().clone().requires_grad_(),
                                                random_weight(100, torch.bfloat16))
        assert attempts == [1]  # remembered: no second failed launch

    def no_device(grid, *args, **meta):
        raise OutOfResources(10**6, 232_448, "shared memory")

    monkeypatch.setattr(rmsnorm, "_launch_backward", no_device)
    monkeypatch.setattr(rmsnorm, "_stages_that_fit", {})
    with pytest.raises(OutOfResources):  # nothing fits: the error surfaces, not a wrong result
        rms_norm(x, random_weight(100, torch.bfloat16), EPS).sum().backward()


def test_launch_overrides_from_context_and_environment(monkeypatch):
    default = backward_launch(8192)
    with launch_overrides(bwd_warps=4, bwd_stages=1):
        assert (backward_launch(8192).num_warps, backward_launch(8192).num_stages) == (4, 1)
    assert backward_launch(8192) == default
    monkeypatch.setenv(ENV_VAR, "fwd_block_m=2, bwd_programs_per_sm=3")
    assert forward_launch(8192).block_m == 2 and backward_launch(8192).programs_per_sm == 3
    monkeypatch.setenv(ENV_VAR, "bwd_warp=4")
    with pytest.raises(ValueError, match="bwd_warp"):
        backward_launch(8192)


def test_row_strided_slice_is_read_in_place_forward_and_backward():
    wide = torch.randn(2, 5, 160, requires_grad=True)
    x = wide[..., :100]
    rows = rmsnorm._as_rows(x, 100)
    assert rows.data_ptr() == x.data_ptr() and rows.stride() == (160, 1), "the slice was copied"
    assert_forward_backward_match_reference(x, random_weight(100, torch.float32), leaf=wide)
    assert (wide.grad[..., 100:] == 0).all()


def test_non_contiguous_layouts_fall_back_to_a_copy_and_match():
    base = torch.randn(5, 2, 40, dtype=torch.bfloat16)
    x = base.transpose(0, 1).detach().requires_grad_()  # leading dims not mergeable into one stride
    assert_forward_backward_match_reference(x, random_weight(40, torch.bfloat16))
    column_major = torch.randn(24, 12).t().detach().requires_grad_()  # last dim not contiguous
    assert_forward_backward_match_reference(column_major, random_weight(24, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_summed", [True, False])
def test_fused_add_rms_norm_outputs_and_gradients_match_reference(dtype, use_summed):
    x = torch.randn(3, 4, 257, dtype=dtype, requires_grad=True)
    residual = torch.randn(3, 4, 257, dtype=dtype, requires_grad=True)
    weight = random_weight(257, dtype)
    normed, summed = fused_add_rms_norm(x, residual, weight, EPS)
    dnormed, dsummed = torch.randn_like(normed), torch.randn_like(summed)
    loss = (normed.float() * dnormed.float()).sum() + ((summed.float() * dsummed.float()).sum() if use_summed else 0)
    loss.backward()

    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, residual, weight))
    summed64 = x64 + r64
    normed64 = rms_norm_reference(summed64, w64, EPS)
    loss64 = (normed64 * dnormed.double()).sum() + ((summed64 * dsummed.double()).sum() if use_summed else 0)
    loss64.backward()
    # On a GPU the sum rounds to nearest like PyTorch's add; the interpreter truncates fp32 -> bf16,
    # so only fp32 is compared exactly here.
    if dtype == torch.float32:
        assert torch.equal(summed, x.detach() + residual.detach())
    assert_matches(summed, summed64.detach(), dtype, "summed")
    assert_matches(normed, rms_norm_reference(summed.detach().double(), w64.detach(), EPS), dtype, "normed")
    # The sum is rounded to `dtype` before normalizing: allow that input rounding in the gradients too.
    assert_matches(x.grad, x64.grad, dtype, "dx")
    assert_matches(residual.grad, r64.grad, dtype, "dresidual")
    assert_matches(weight.grad, w64.grad, dtype, "dweight")


def test_torch_compile_fullgraph_sees_each_kernel_as_one_custom_op():
    captured = []

    def recording_backend(graph_module, example_inputs):
        captured.append({str(node.target) for node in graph_module.graph.nodes})
        return graph_module.forward

    def block(x, residual, weight):
        normed, summed = fused_add_rms_norm(x, residual, weight, EPS)
        return rms_norm(normed * 2.0, weight, EPS) + summed

    compiled_aot = torch.compile(block, backend="aot_eager", fullgraph=True)
    inputs = [torch.randn(2, 3, 48, requires_grad=True), torch.randn(2, 3, 48, requires_grad=True),
              random_weight(48, torch.float32)]
    inputs_eager = [t.detach().clone().requires_grad_() for t in inputs]
    out, out_eager = compiled_aot(*inputs), block(*inputs_eager)
    out.square().sum().backward()
    out_eager.square().sum().backward()
    torch.testing.assert_close(out, out_eager)
    for got, want in zip(inputs, inputs_eager):
        torch.testing.assert_close(got.grad, want.grad)

    torch.compile(block, backend=recording_backend, fullgraph=True)(*inputs)
    targets = captured[0]  # one graph (fullgraph), each kernel one opaque node
    assert {"torchtitan_like.rms_norm_fwd", "torchtitan_like.fused_add_rms_norm_fwd"} <= targets
    assert not any("rsqrt" in target or "pow" in target for target in targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_module_equals_torch_nn_rmsnorm_with_the_same_weight(dtype):
    ours, theirs = TritonRMSNorm(64, eps=1e-5).to(dtype), torch.nn.RMSNorm(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(random_weight(64, dtype))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 5, 64, dtype=dtype)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
    dy = torch.randn_like(y_ours)
    y_ours.backward(dy)
    y_theirs.backward(dy)
    rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(y_ours, y_theirs, rtol=rtol, atol=atol)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=rtol, atol=atol)
    torch.testing.assert_close(ours.weight.grad.float(), theirs.weight.grad.float(), rtol=rtol, atol=atol * 10)
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(64, dtype=dtype))


def test_module_uses_the_reference_when_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(rmsnorm, "_kernels_interpreted", lambda: False)
    monkeypatch.setattr(rmsnorm, "_forward", lambda *args: pytest.fail("kernel launched without Triton"))
    norm = TritonRMSNorm(16)
    x = torch.randn(3, 16)
    assert not triton_available_for(x)
    torch.testing.assert_close(norm(x), rms_norm_reference(x, norm.weight, norm.eps))


def test_launch_heuristics_cover_hidden_sizes_up_to_16384_and_beyond():
    assert forward_launch(2048) == ForwardLaunch(2, 2048, 8)
    assert forward_launch(4096) == ForwardLaunch(1, 4096, 8)
    assert forward_launch(12000) == forward_launch(16384) == ForwardLaunch(1, 16384, 16)
    assert backward_launch(2048) == BackwardLaunch(2, 2048, 8, 3, 2)
    assert backward_launch(8192) == BackwardLaunch(1, 8192, 16, 3, 1)
    assert backward_launch(16384) == BackwardLaunch(1, 16384, 16, 3, 1)
    assert backward_launch(33).block_m * backward_launch(33).block_n == 4096
    with pytest.raises(ValueError, match="hidden size"):
        rmsnorm._check_hidden(rmsnorm.MAX_HIDDEN + 1)


def test_llama3_debugmodel_with_triton_rmsnorm_matches_nn_rmsnorm(monkeypatch):
    from torchtitan_like.models.llama3 import Transformer, get_flavor

    def build(norm_type):
        args = get_flavor("debugmodel")
        args.vocab_size, args.n_layers, args.dim, args.max_seq_len, args.norm_type = 258, 1, 64, 32, norm_type
        return Transformer(args)

    reference, triton_model = build("rmsnorm"), build("triton_rmsnorm")
    reference.init_weights(seed=0)
    with torch.no_grad():  # norm weights away from 1 so a wrong dweight or scaling would show
        for name, param in reference.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    triton_model.load_state_dict(reference.state_dict())
    assert sum(isinstance(m, TritonRMSNorm) for m in triton_model.modules()) == 3
    tokens = torch.randint(0, 258, (2, 16))
    losses = []
    fused_calls = []
    fused = rmsnorm.fused_add_rms_norm
    monkeypatch.setattr(rmsnorm, "fused_add_rms_norm", lambda *args: fused_calls.append(1) or fused(*args))
    for model in (reference, triton_model):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss)
    assert len(fused_calls) == 1  # the block's residual add and ffn_norm ran as the fused kernel
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    grads = dict(reference.named_parameters())
    for name, param in triton_model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def _sequence_parallel_worker(rank, world_size, folder, x_full, weight_full, dy_full):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        norm = TritonRMSNorm(x_full.shape[-1], eps=EPS)
        with torch.no_grad():
            norm.weight.copy_(weight_full)
        norm.weight = torch.nn.Parameter(distribute_tensor(norm.weight.detach(), mesh, [Replicate()]))
        x = distribute_tensor(x_full, mesh, [Shard(1)]).requires_grad_()
        y = norm(x)
        y.backward(distribute_tensor(dy_full, mesh, [Shard(1)]))
        y_full, dx_full, dw_full = y.full_tensor(), x.grad.full_tensor(), norm.weight.grad.full_tensor()
        if rank == 0:
            used_kernels = rmsnorm._kernels_interpreted() and triton_available_for(x.to_local())
            torch.save((used_kernels and y.placements == x.placements, y_full.detach(), dx_full, dw_full),
                       f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


def test_module_on_sequence_parallel_dtensors_matches_full_reference(tmp_path):
    # Two gloo ranks, x sharded on the sequence dim, weight replicated: the weight gradient must sum
    # both ranks' rows (Partial), not keep one rank's.
    import torch.multiprocessing as mp

    x, weight, dy = torch.randn(2, 6, 40), 1.0 + 0.3 * torch.randn(40), torch.randn(2, 6, 40)
    mp.start_processes(_sequence_parallel_worker, args=(2, str(tmp_path), x, weight, dy), nprocs=2, join=True,
                       start_method="fork")
    used_kernels_and_kept_placements, y, dx, dw = torch.load(tmp_path / "result.pt")
    y_ref, dx_ref, dw_ref, dx_scale, dw_scale = reference_float64(x, weight, dy)
    assert used_kernels_and_kept_placements
    assert_matches(y, y_ref, torch.float32, "y")
    assert_matches(dx, dx_ref, torch.float32, "dx", dx_scale)
    assert_matches(dw, dw_ref, torch.float32, "dweight", dw_scale)


def test_add_and_norm_promotes_a_bf16_update_into_an_fp32_stream_bit_exactly():
    # Under autocast the residual stream is fp32 and sub-layer outputs are bf16.
    norm = TritonRMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(random_weight(48, torch.float32))
    x, update = torch.randn(3, 5, 48), torch.randn(3, 5, 48).to(torch.bfloat16)
    summed, normed = norm.add_and_norm(x, update)
    expected_sum = x + update
    assert summed.dtype == normed.dtype == torch.float32
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(normed, norm(expected_sum), rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype, update_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)])
def test_add_and_norm_never_rounds_the_sum_to_the_narrower_stream_dtype(x_dtype, update_dtype):
    # `x + update` computes in the promoted dtype (fp32 here); the fused path must not first round
    # the wider input down to x's dtype.
    norm = TritonRMSNorm(48, eps=EPS)
    with torch.no_grad():
        norm.weight.copy_(random_weight(48, torch.float32))
    x, update = torch.randn(3, 5, 48).to(x_dtype), torch.randn(3, 5, 48).to(update_dtype)
    summed, normed = norm.add_and_norm(x, update)
    expected_sum = x + update
    assert summed.dtype == normed.dtype == expected_sum.dtype == torch.float32
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(normed, norm(expected_sum), rtol=0, atol=0)
