"""Float8Linear under tensor parallel (kernels/float8/linear.py): a colwise layer feeding a rowwise
layer on 2 gloo ranks gives the output and gradients of the same unsharded Float8Linear pair.

The shards are given different magnitudes (rank 1's half of W1 and of the hidden activations is
larger, W2's second half smaller) so that a scale taken from a local amax instead of the reduced one
would cast differently and fail the comparison. The tolerance covers fp32 summation order only: the
fp8 operands are the same bits. High precision differs from fp8 by about 3%, so a silent fallback to
F.linear fails as well.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from torchtitan_like.kernels.float8 import Float8Linear
from torchtitan_like.kernels.float8 import quantize as q

SAME_FP8_OPERANDS = 1e-5  # relative error of y, dx, dW1, dW2 against the unsharded layers


class _Pair(nn.Module):
    def __init__(self, recipe, backend, emulate):
        super().__init__()
        options = {"bias": False, "recipe": recipe, "backend": backend, "emulate": emulate}
        self.w1 = Float8Linear(32, 64, **options)
        self.w2 = Float8Linear(64, 32, **options)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


def _inputs():
    torch.manual_seed(0)
    w1, w2 = torch.randn(64, 32) * 0.2, torch.randn(32, 64) * 0.2
    w1[32:] *= 8.0   # rank 1's colwise shard (and its hidden features) larger
    w2[:, 32:] *= 0.1  # rank 1's rowwise shard smaller
    return torch.randn(2, 8, 32), w1, w2, torch.randn(2, 8, 32)


def _run(model, x, grad_output):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad_output)
    return [t.detach() for t in (y, x.grad, model.w1.weight.grad, model.w2.weight.grad)]


def _worker(rank, world_size, folder, recipe, backend, emulate):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    q.POISON_OUTPUTS = True
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        x, w1, w2, grad_output = _inputs()
        model = _Pair(recipe, backend, emulate)
        with torch.no_grad():
            model.w1.weight.copy_(w1)
            model.w2.weight.copy_(w2)
        mesh = init_device_mesh("cpu", (world_size,))
        parallelize_module(model, mesh, {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
        y, dx, dw1, dw2 = _run(model, x, grad_output)
        # full_tensor() may hand back an async collective result: clone() waits and gives a plain tensor
        results = [(t.full_tensor() if isinstance(t, DTensor) else t).clone() for t in (y, dx, dw1, dw2)]
        if rank == 0:
            torch.save({"tp": results, "fell_back": model.w1._warned_dtensor or model.w2._warned_dtensor},
                       f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.timeout(120)  # a hung rank fails the test instead of blocking CI
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backend,emulate", [("auto", True), ("triton", False)])
def test_colwise_then_rowwise_float8_matches_unsharded_float8(tmp_path, recipe, backend, emulate):
    mp.start_processes(_worker, args=(2, str(tmp_path), recipe, backend, emulate), nprocs=2, join=True,
                       start_method="fork")
    result = torch.load(tmp_path / "result.pt")
    assert not result["fell_back"]

    x, w1, w2, grad_output = _inputs()
    unsharded = _Pair(recipe, backend, emulate)
    plain = nn.Sequential(nn.Linear(32, 64, bias=False), nn.ReLU(), nn.Linear(64, 32, bias=False))
    with torch.no_grad():
        for layers in ((unsharded.w1, unsharded.w2), (plain[0], plain[2])):
            layers[0].weight.copy_(w1)
            layers[1].weight.copy_(w2)
    expected = _run(unsharded, x, grad_output)
    y_plain = plain(x)
    for name, actual, reference in zip(("y", "dx", "dW1", "dW2"), result["tp"], expected):
        assert actual.shape == reference.shape, name
        assert _relative_error(actual, reference) < SAME_FP8_OPERANDS, name
    assert _relative_error(result["tp"][0], y_plain.detach()) > 1e-3  # fp8 was used, not high precision
