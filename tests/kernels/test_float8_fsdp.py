"""FSDP2 all-gather of Float8Linear weights in fp8 (kernels/float8/fsdp.py) on 2 gloo ranks.

The same small model of Float8Linear layers runs under `fully_shard` with the fp8 all-gather off
(weights gathered in fp32, cast after the gather) and on: the fp8 operands are the same bits, so the
outputs, input gradients, reduce-scattered weight gradients and optimizer steps must be bitwise equal.
Rank 1's half of every weight is 8x larger than rank 0's, so a scale taken from a shard's local amax
instead of the full weight's would cast rank 0's shard differently and fail the comparison.
"""

import functools
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from tests.forking import run_cli_cases
from tests.helpers import tiny_overrides
from torchtitan_like.distributed.tensors import assign_full_value
from torchtitan_like.errors import ConfigError
from torchtitan_like.kernels.float8 import (Float8AllGatherWeight, Float8GatheredWeight, Float8Linear,
                                            convert_to_float8, enable_float8_all_gather, fsdp,
                                            precompute_float8_scales)
from torchtitan_like.kernels.float8 import quantize as q

TIMEOUT_SECONDS = 120
WORLD_SIZE = 2
SHAPES = ((64, 32), (32, 64))  # (out_features, in_features) of the two layers
BATCH = (2, 8, 32)


class _Stack(nn.Module):
    def __init__(self, backend, emulate):
        super().__init__()
        self.w1 = Float8Linear(32, 64, bias=True, backend=backend, emulate=emulate)
        self.w2 = Float8Linear(64, 32, bias=False, backend=backend, emulate=emulate)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


def _full_weights():
    torch.manual_seed(0)
    weights = [torch.randn(shape) * 0.2 for shape in SHAPES]
    for weight in weights:
        weight[weight.shape[0] // 2:] *= 8.0  # FSDP shards dim 0: rank 1's shard is the larger one
    return weights, torch.randn(64) * 0.1


def _build(backend, emulate, mesh, all_gather):
    """Meta init -> (fp8 all-gather) -> fully_shard -> to_empty -> seeded values, as the trainer does."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = _Stack(backend, emulate)
    if all_gather:
        enable_float8_all_gather(model.w1)
        enable_float8_all_gather(model.w2)
    fully_shard(model.w1, mesh=mesh)
    fully_shard(model.w2, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    weights, bias = _full_weights()
    with torch.no_grad():
        assign_full_value(model.w1.weight, weights[0])
        assign_full_value(model.w2.weight, weights[1])
        assign_full_value(model.w1.bias, bias)
    return model


def _step(model, x, grad_output):
    """Forward + backward -> output, input grad and the full (reduce-scattered, gathered) weight grads."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad_output)
    grads = [param.grad.full_tensor() for param in model.parameters()]
    return [y.detach(), x.grad] + grads


def _full_params(model):
    return [param.detach().full_tensor() for param in model.parameters()]


def _record_gathered_weights(model, log):
    """What each Float8Linear sees as its weight in forward: type, data dtype, bytes per element."""
    def hook(module, args):
        weight = module.weight
        data = getattr(weight, "_data", weight)
        log.append((type(weight).__name__, data.dtype, data.untyped_storage().nbytes() // weight.numel()))

    for layer in (model.w1, model.w2):
        layer.register_forward_pre_hook(hook)


def _count_calls(module, name, counter):
    original = getattr(module, name)

    @functools.wraps(original)  # keeps the signature FSDP2 inspects for the hook's arity
    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        counter.append(result)
        return result

    setattr(module, name, counted)


def _worker(rank, world_size, folder, backend, emulate):
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.device_mesh import init_device_mesh

    q.POISON_OUTPUTS = True
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        torch.manual_seed(1 + rank)  # every rank its own batch, as in data parallel
        x, grad_output = torch.randn(BATCH), torch.randn(BATCH)
        all_reduces, pre_all_gathers, seen = [], [], []
        _count_calls(funcol, "all_reduce", all_reduces)
        _count_calls(Float8AllGatherWeight, "fsdp_pre_all_gather", pre_all_gathers)

        plain = _build(backend, emulate, mesh, all_gather=False)
        gathered = _build(backend, emulate, mesh, all_gather=True)
        precomputed = _build(backend, emulate, mesh, all_gather=True)
        _record_gathered_weights(gathered, seen)
        results = {"plain": _step(plain, x, grad_output)}
        del all_reduces[:]
        results["fp8_all_gather"] = _step(gathered, x, grad_output)
        results["per_step_all_reduces"] = len(all_reduces)
        results["all_gather_inputs"] = [(inputs[0].dtype, inputs[0].numel()) for inputs, _ in pre_all_gathers]

        del all_reduces[:]
        results["precomputed_count"] = precompute_float8_scales([precomputed])
        results["precompute_all_reduces"] = len(all_reduces)
        results["precomputed"] = _step(precomputed, x, grad_output)
        results["all_reduces_after_precompute"] = len(all_reduces) - 1

        results.update(_optimizer_step_results(plain, gathered, precomputed, x, grad_output, all_reduces))
        results.update(_triton_adamw_results(backend, emulate, mesh, x, grad_output))
        results["seen"] = seen
        if rank == 0:
            torch.save(results, f"{folder}/result.pt")
    finally:
        dist.destroy_process_group()


def _optimizer_step_results(plain, gathered, precomputed, x, grad_output, all_reduces):
    """One AdamW step on each model, then: params, wrappers kept, and a second forward/backward."""
    models = {"plain": plain, "fp8_all_gather": gathered, "precomputed": precomputed}
    for model in models.values():
        torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True).step()
        model.zero_grad(set_to_none=True)
    results = {f"{name}_params": _full_params(model) for name, model in models.items()}
    results["wrappers_kept"] = all(isinstance(layer.weight._local_tensor, Float8AllGatherWeight)
                                   for model in (gathered, precomputed) for layer in (model.w1, model.w2))
    del all_reduces[:]
    # the step changed the shards since the precompute: the stale scales must not be used
    results["precomputed_second"] = _step(precomputed, x, grad_output)
    results["stale_fallback_all_reduces"] = len(all_reduces)
    results["plain_second"] = _step(plain, x, grad_output)
    return results


def _triton_adamw_results(backend, emulate, mesh, x, grad_output):
    """One TritonAdamW step (the GPU default; its kernel under the interpreter here) on plain shards
    and on fp8-all-gather shards whose scales were precomputed before it, then a second forward/backward."""
    from torchtitan_like.kernels.adamw import TritonAdamW

    models = {"plain": _build(backend, emulate, mesh, all_gather=False),
              "precomputed": _build(backend, emulate, mesh, all_gather=True)}
    for model in models.values():
        _step(model, x, grad_output)
    precompute_float8_scales([models["precomputed"]])
    for model in models.values():
        TritonAdamW(model.parameters(), lr=1e-2).step()
        model.zero_grad(set_to_none=True)
    results = {f"triton_{name}_params": _full_params(model) for name, model in models.items()}
    results["triton_scales_kept"] = [layer.weight._local_tensor._precomputed_scale is not None
                                     for layer in (models["precomputed"].w1, models["precomputed"].w2)]
    results["triton_precomputed_second"] = _step(models["precomputed"], x, grad_output)
    results["triton_plain_second"] = _step(models["plain"], x, grad_output)
    return results


def _assert_bitwise_equal(actual, expected, label):
    assert len(actual) == len(expected), label
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and torch.equal(a, e), f"{label}[{index}]: max diff {(a - e).abs().max()}"


@pytest.fixture(scope="module", params=[("auto", True), ("triton", False)], ids=["emulate", "triton"])
def results(request, tmp_path_factory):
    backend, emulate = request.param
    folder = tmp_path_factory.mktemp(f"fsdp_{backend}")
    mp.start_processes(_worker, args=(WORLD_SIZE, str(folder), backend, emulate), nprocs=WORLD_SIZE, join=True,
                       start_method="fork")
    return torch.load(folder / "result.pt")


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_fp8_all_gather_gives_the_bitwise_outputs_and_gradients_of_the_fp32_all_gather(results):
    _assert_bitwise_equal(results["fp8_all_gather"], results["plain"], "y, dx, dW1, db1, dW2")
    # each all-gather (forward, and again in backward after the reshard) reduces its weight's amax
    assert results["per_step_all_reduces"] == len(results["all_gather_inputs"]) == 2 * len(SHAPES)


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_the_all_gather_moves_one_byte_per_weight_element_and_forward_sees_fp8_data(results):
    shard_numels = [out * inp // WORLD_SIZE for out, inp in SHAPES]
    assert results["all_gather_inputs"][:2] == [(torch.uint8, numel) for numel in shard_numels]
    assert set(results["seen"]) == {(Float8GatheredWeight.__name__, torch.float8_e4m3fn, 1)}


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_precomputed_scales_use_one_all_reduce_for_all_weights_and_change_nothing(results):
    assert results["precomputed_count"] == 2
    assert results["precompute_all_reduces"] == 1
    assert results["all_reduces_after_precompute"] == 0
    _assert_bitwise_equal(results["precomputed"], results["plain"], "precomputed")


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_optimizer_step_updates_wrapped_shards_like_plain_ones_and_stale_scales_are_not_reused(results):
    assert results["wrappers_kept"]
    _assert_bitwise_equal(results["fp8_all_gather_params"], results["plain_params"], "params after step")
    _assert_bitwise_equal(results["precomputed_params"], results["plain_params"], "precomputed params after step")
    assert results["stale_fallback_all_reduces"] == 2 * len(SHAPES)
    _assert_bitwise_equal(results["precomputed_second"], results["plain_second"], "second step")


@pytest.mark.timeout(TIMEOUT_SECONDS)
def test_triton_adamw_updates_wrapped_shards_like_plain_ones_and_drops_their_precomputed_scales(results):
    # The wrapper has no storage for the kernel to write (it crashed), and the kernel's writes bypass
    # the wrapper's dispatch, so the step itself must drop the scales precomputed before it.
    _assert_bitwise_equal(results["triton_precomputed_params"], results["triton_plain_params"], "params after step")
    assert results["triton_scales_kept"] == [False, False]
    _assert_bitwise_equal(results["triton_precomputed_second"], results["triton_plain_second"], "second step")


def _float8_config(**overrides):
    from torchtitan_like.config.job_config import Float8

    return Float8(**{"enable": True, "emulate": True, **overrides})


@pytest.mark.parametrize("overrides,message", [
    ({"precompute_float8_dynamic_scale_for_fsdp": True}, "needs float8.enable_fsdp_float8_all_gather"),
    ({"enable_fsdp_float8_all_gather": True, "recipe_name": "rowwise"}, "only with recipe_name"),
])
def test_invalid_float8_all_gather_combinations_are_config_errors(overrides, message):
    model = nn.Sequential(nn.Linear(32, 32))
    with pytest.raises(ConfigError, match=message):
        convert_to_float8(model, _float8_config(**overrides))


UNSUPPORTED_FP8_ALL_GATHER_CONFIGS = [
    (["--float8.enable_fsdp_float8_all_gather", "true", "--parallelism.tensor_parallel_degree", "2"],
     "float8.enable_fsdp_float8_all_gather = true is not supported with parallelism.tensor_parallel_degree = 2"),
    (["--float8.precompute_float8_dynamic_scale_for_fsdp", "true"],
     "float8.precompute_float8_dynamic_scale_for_fsdp = true needs float8.enable_fsdp_float8_all_gather = true"),
]


@pytest.fixture(scope="module")
def unsupported_config_results(tmp_path_factory):
    """The CLI on each unsupported config, forked from one interpreter that imported the trainer once
    (tests/forking.py: start-up is almost all of each run)."""
    cases = {str(index): {"args": [*tiny_overrides(str(tmp_path_factory.mktemp(f"fp8_config{index}"))),
                                   "--float8.enable", "true", "--float8.emulate", "true", *extra]}
             for index, (extra, _) in enumerate(UNSUPPORTED_FP8_ALL_GATHER_CONFIGS)}
    return run_cli_cases(cases, case_timeout=120)


@pytest.mark.parametrize("extra,message", UNSUPPORTED_FP8_ALL_GATHER_CONFIGS)
def test_trainer_refuses_unsupported_fp8_all_gather_configs_at_start_up(unsupported_config_results, extra, message):
    # a single process: the check must come before the tensor-parallel degree is compared with the world
    result = unsupported_config_results[str(UNSUPPORTED_FP8_ALL_GATHER_CONFIGS.index((extra, message)))]
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_convert_wraps_only_swapped_weights_and_without_fsdp_the_wrapper_is_transparent():
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))  # 8 outputs: not swapped
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    model.load_state_dict(reference.state_dict())
    convert_to_float8(reference, _float8_config())
    convert_to_float8(model, _float8_config(enable_fsdp_float8_all_gather=True))
    assert isinstance(model[0].weight, Float8AllGatherWeight) and isinstance(model[0].weight, nn.Parameter)
    assert type(model[2].weight) is nn.Parameter
    x = torch.randn(4, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert fsdp.float8_all_gather_shards([model]) == []  # not FSDP-sharded: nothing to precompute
    assert type(model.state_dict()["0.weight"]) is torch.Tensor  # checkpoints never see the subclass


def test_a_precomputed_scale_carries_over_to_copies_of_the_shard_and_not_past_a_mutation():
    # With CPU offload FSDP2 all-gathers from `shard.to(device)`: the copy must keep the scale
    # that precompute_float8_dynamic_scale_for_fsdp set, or every all-gather recomputes it.
    shard = Float8AllGatherWeight(torch.randn(8, 16))
    scale = torch.tensor(3.0)
    shard.set_precomputed_scale(scale)
    for copy in (shard.to("cpu", copy=True), shard.clone()):
        assert isinstance(copy, Float8AllGatherWeight) and torch.equal(copy._precomputed_scale, scale)
        copy.mul_(2.0)  # new values: the scale no longer holds
        assert copy._precomputed_scale is None
    assert torch.equal(shard._precomputed_scale, scale)  # the copies' mutations leave the source alone
    assert shard.new_zeros(shard.shape)._precomputed_scale is None  # other values: no scale
