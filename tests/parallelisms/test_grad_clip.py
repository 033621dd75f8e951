"""Gradient clipping by the global norm (parallelisms/grad_clip.py): in place, or inside fused AdamW.

Across meshes (FSDP, TP, PP) every parity plan of tests/parallelisms/ covers it: the debug model's
gradient norm (about 2) is above its max_norm of 1.0, so every plan clips, and the plans agree with
the single-process run only if each computes the global norm.
"""

import math

import pytest
import torch

from torchtitan_like.parallelisms.grad_clip import clip_grad_norm, fuses_gradient_clipping


def parameters_with_gradients(*gradients):
    params = []
    for gradient in gradients:
        param = torch.nn.Parameter(torch.zeros_like(gradient))
        param.grad = gradient.clone()
        params.append(param)
    return params


def total_norm(params) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in params))


def test_gradients_above_max_norm_are_scaled_down_to_it_and_the_norm_before_is_returned():
    generator = torch.Generator().manual_seed(0)
    gradients = [torch.randn(8, 4, generator=generator) * 3, torch.randn(5, generator=generator)]
    params = parameters_with_gradients(*gradients)
    before = total_norm(params)
    assert before > 1.0

    returned = clip_grad_norm(params, 1.0, None, None)

    assert math.isclose(float(returned), before, rel_tol=1e-6)
    assert math.isclose(total_norm(params), 1.0, rel_tol=1e-5)
    # one coefficient for all: the direction of the whole gradient is kept
    for param, gradient in zip(params, gradients):
        torch.testing.assert_close(param.grad, gradient * (1.0 / (before + 1e-6)), rtol=1e-6, atol=0.0)


def test_gradients_within_max_norm_or_with_clipping_off_are_untouched():
    gradients = [torch.full((3,), 0.1), torch.full((2, 2), -0.2)]
    within = parameters_with_gradients(*gradients)
    clip_grad_norm(within, 1.0, None, None)
    off = parameters_with_gradients(*(g * 100 for g in gradients))
    returned = clip_grad_norm(off, 0.0, None, None)
    for param, gradient in zip(within, gradients):
        assert torch.equal(param.grad, gradient)
    for param, gradient in zip(off, gradients):
        assert torch.equal(param.grad, gradient * 100)
    assert math.isclose(float(returned), total_norm(off), rel_tol=1e-6)


def test_parameters_without_gradients_are_skipped():
    params = parameters_with_gradients(torch.full((4,), 2.0))
    frozen = torch.nn.Parameter(torch.ones(3))
    returned = clip_grad_norm([frozen, *params], 1.0, None, None)
    assert frozen.grad is None
    assert math.isclose(float(returned), 4.0, rel_tol=1e-6)
    assert math.isclose(total_norm(params), 1.0, rel_tol=1e-5)


def train_linear(implementation: str, clip_in_optimizer: bool, max_norm: float, steps: int = 4):
    """A few AdamW steps on a linear layer whose gradients are well above max_norm."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 8)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, fused=implementation == "fused",
                                  foreach=implementation == "foreach")
    norms = []
    for _ in range(steps):
        optimizer.zero_grad()
        (layer(torch.randn(32, 16)) * 10).pow(2).sum().backward()
        norms.append(float(clip_grad_norm(list(layer.parameters()), max_norm, None, None,
                                          optimizer=optimizer if clip_in_optimizer else None)))
        optimizer.step()
    return [p.detach().clone() for p in layer.parameters()], [p.grad.clone() for p in layer.parameters()], norms


def test_fused_adamw_applies_the_clip_in_its_kernel_with_the_in_place_results():
    assert fuses_gradient_clipping(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], fused=True))
    assert not fuses_gradient_clipping(torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], foreach=True))
    reference = train_linear("foreach", clip_in_optimizer=False, max_norm=1.0)
    fused = train_linear("fused", clip_in_optimizer=True, max_norm=1.0)
    unclipped = train_linear("fused", clip_in_optimizer=True, max_norm=0.0)
    assert min(reference[2]) > 10  # every step clips
    assert all(math.isclose(got, want, rel_tol=1e-5) for got, want in zip(fused[2], reference[2]))
    for got, want in zip(fused[0] + fused[1], reference[0] + reference[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the gradients the kernel stored back are the clipped ones
    assert math.isclose(math.sqrt(sum(float(g.double().pow(2).sum()) for g in fused[1])), 1.0, rel_tol=1e-5)
    # and without clipping the result differs: the comparison above is not vacuous
    assert not torch.allclose(unclipped[0][0], reference[0][0], rtol=1e-3)


@pytest.mark.slow
def test_fsdp2_with_the_clip_in_fused_adamw_matches_single_process_foreach(assert_plan_matches_reference):
    assert_plan_matches_reference("fsdp2_fused_adamw")


def _clip_with_one_stage_holding_no_gradients(rank, world_size, out_dir):
    from types import SimpleNamespace

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("pp",))
    params = parameters_with_gradients(torch.full((4,), 3.0)) if rank == 0 else []
    returned = clip_grad_norm(params, 1.0, SimpleNamespace(pp_enabled=True), mesh)
    clipped = total_norm(params) if params else None
    torch.save({"norm": float(returned), "clipped": clipped, "dtensor": _clip_dtensor_gradients(world_size)},
               f"{out_dir}/rank{rank}.pt")


def _clip_dtensor_gradients(world_size):
    """Clip DTensor gradients of the three placements TP gives them (a sequence-parallel norm's
    weight gets a Partial one); returns their full values after the clip, and the norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("tp",))
    rank = mesh.get_local_rank()
    # full gradient values: partial 4 x (rank + 1) summed = 4 x 3; a shard of 2 x 2.0; a replica of 6.0
    gradients = [DTensor.from_local(torch.full((4,), float(rank + 1)), mesh, [Partial()]),
                 DTensor.from_local(torch.full((2,), 2.0), mesh, [Shard(0)]),
                 DTensor.from_local(torch.full((1,), 6.0), mesh, [Replicate()])]
    params = []
    for gradient in gradients:
        param = torch.nn.Parameter(torch.zeros_like(gradient))
        param.grad = gradient
        params.append(param)
    norm = clip_grad_norm(params, 1.0, None, mesh)
    return {"norm": float(norm), "clipped": [param.grad.full_tensor() for param in params]}


def test_a_pipeline_stage_without_gradients_joins_the_norm_reduction_instead_of_hanging_the_others(tmp_path):
    from tests.checkpoint.common import run_on_ranks

    run_on_ranks(_clip_with_one_stage_holding_no_gradients, 2, str(tmp_path), timeout=60)  # fails on a hang
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    # both stages return the global norm sqrt(4 * 3^2) = 6; the stage with gradients clips them to 1
    assert [math.isclose(result["norm"], 6.0, rel_tol=1e-6) for result in results] == [True, True], results
    assert math.isclose(results[0]["clipped"], 1.0, rel_tol=1e-5) and results[1]["clipped"] is None
    # DTensor gradients: the global norm sqrt(4 x 3^2 + 4 x 2^2 + 6^2) = sqrt(88), and every placement
    # scaled by 1 / sqrt(88). torch 2.11's foreach multiply left the Partial one unscaled.
    for result in results:
        norm, clipped = result["dtensor"]["norm"], result["dtensor"]["clipped"]
        assert math.isclose(norm, math.sqrt(88.0), rel_tol=1e-6), norm
        for value, gradient in zip((3.0, 2.0, 6.0), clipped):
            torch.testing.assert_close(gradient, torch.full_like(gradient, value / math.sqrt(88.0)))
