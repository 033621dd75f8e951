"""Triton AdamW / Adam (kernels/adamw.py) under the Triton interpreter, against torch's for-loop
optimizers (foreach=False) run on the same fresh random parameters and gradients.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET is set before
anything imports triton or the kernels. Run as a script (under torchrun, 2 gloo ranks) this module is
also the worker of the DTensor test.

Tolerances, fp32, found over 4 steps of both optimizers with and without grad_scale: the moments
are bit-identical to torch's (the kernel rounds where torch's CPU kernels do, fmas included); the
parameters differ in 2 or 3 of ~6,500 elements by 1 to 3 ulps, because torch's vectorized CPU
sqrt is not correctly rounded (1 ulp off on ~0.7% of elements; the kernel's sqrt_rn, like the
GPU's, is), which moves an update by an ulp. Hence rtol 2.5e-7 (two ulps) and atol 1e-9 (a few
ulps of an update for parameters near zero).
bf16 (fp32 math, results rounded once, as torch's fused kernel): against the same math in fp32 ops
at most one bf16 rounding apart (rtol 2^-8); against torch's for-loop, which rounds every
intermediate to bf16, rtol 2^-7 and atol 2^-5 (two bf16 ulps of values up to ~4, or a few of the
first steps' updates ~0.1), and the kernel's error against float64 math is no larger than torch's.
"""

import copy
import os
import shutil

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from torchtitan_like.kernels import adamw  # noqa: E402
from torchtitan_like.kernels.adamw import TritonAdam, TritonAdamW, adam_step_, adam_step_reference  # noqa: E402

TOLERANCES = {torch.float32: dict(rtol=2.5e-7, atol=1e-9), torch.bfloat16: dict(rtol=2 ** -7, atol=2 ** -5)}
# decayed group: a non-power-of-two vector and a matrix; undecayed: a vector and one that never has a grad
DECAYED_SHAPES, UNDECAYED_SHAPES = [(4099,), (33, 65)], [(7,), (5,)]
LRS = [1e-2, 5e-3, 2e-2, 1e-3]  # the learning rate changes between steps, as under a schedule
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
PAIRS = {"AdamW": (TritonAdamW, torch.optim.AdamW), "Adam": (TritonAdam, torch.optim.Adam)}


def fresh_params(dtype, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in DECAYED_SHAPES + UNDECAYED_SHAPES]


def fresh_grads(dtype, step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(shape, generator=generator).to(dtype) for shape in DECAYED_SHAPES + UNDECAYED_SHAPES[:1]]


def build(optimizer_class, values: list[torch.Tensor], **kwargs):
    params = [torch.nn.Parameter(value.clone()) for value in values]
    groups = [{"params": params[:2], "weight_decay": WEIGHT_DECAY}, {"params": params[2:], "weight_decay": 0.0}]
    return params, optimizer_class(groups, lr=LRS[0], betas=BETAS, eps=EPS, **kwargs)


def take_steps(params, optimizer, steps, dtype, grad_scale=None, first_step=0, divide_grads=False,
               lr_scale_last=1.0):
    """`steps` steps with the step's fresh gradients and lr; `divide_grads`: hand the optimizer the
    gradients already divided by grad_scale (the reference), else set `optimizer.grad_scale`."""
    for step in range(first_step, first_step + steps):
        scale = None if grad_scale is None else torch.tensor(grad_scale * (1 + step))
        for param, grad in zip(params, fresh_grads(dtype, step)):
            param.grad = grad / scale.to(dtype) if divide_grads and scale is not None else grad.clone()
        if scale is not None and not divide_grads:
            optimizer.grad_scale = scale
        for group in optimizer.param_groups:
            group["lr"] = LRS[step % len(LRS)] * (lr_scale_last if step == first_step + steps - 1 else 1.0)
        optimizer.step()


def assert_same(params, optimizer, ref_params, ref_optimizer, **tolerance):
    for param, ref_param in zip(params, ref_params):
        torch.testing.assert_close(param, ref_param, **tolerance)
        state, ref_state = optimizer.state[param], ref_optimizer.state[ref_param]
        assert set(state) == set(ref_state)
        for name in state:
            torch.testing.assert_close(state[name], ref_state[name], **tolerance,
                                       msg=lambda message, name=name: f"{name}: {message}")


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("grad_scale", [None, 3.5])
def test_four_steps_match_torch_for_loop_optimizer(name, grad_scale):
    ours_class, torch_class = PAIRS[name]
    values = fresh_params(torch.float32)
    params, optimizer = build(ours_class, values)
    ref_params, ref_optimizer = build(torch_class, values, foreach=False)
    take_steps(params, optimizer, 4, torch.float32, grad_scale)
    take_steps(ref_params, ref_optimizer, 4, torch.float32, grad_scale, divide_grads=True)
    assert_same(params, optimizer, ref_params, ref_optimizer, **TOLERANCES[torch.float32])
    steps = [optimizer.state[param]["step"] for param in params[:3]]
    assert all(step.device.type == "cpu" and step.dtype == torch.float32 and step.item() == 4 for step in steps)
    # the parameter without a gradient is untouched and has no state
    assert torch.equal(params[-1], values[-1]) and len(optimizer.state[params[-1]]) == 0
    # the kernel reads the gradient and leaves it as it was: unclipped
    for param, grad in zip(params, fresh_grads(torch.float32, 3)):
        assert torch.equal(param.grad, grad)


@pytest.mark.parametrize("name", PAIRS)
def test_moments_are_bit_identical_to_torch_and_a_changed_lr_is_seen(name):
    ours_class, torch_class = PAIRS[name]
    values = fresh_params(torch.float32)
    params, optimizer = build(ours_class, values)
    ref_params, ref_optimizer = build(torch_class, values, foreach=False)
    take_steps(params, optimizer, 4, torch.float32, 3.5)
    take_steps(ref_params, ref_optimizer, 4, torch.float32, 3.5, divide_grads=True)
    for param, ref_param in zip(params[:3], ref_params[:3]):
        for state_name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optimizer.state[param][state_name], ref_optimizer.state[ref_param][state_name])
    # the tolerance is tight enough to see the lr of the last step changed by 0.1%
    other_params, other = build(ours_class, values)
    take_steps(other_params, other, 4, torch.float32, 3.5, lr_scale_last=1.001)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(other_params[0], params[0], **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", PAIRS)
def test_bf16_params_use_fp32_math_closer_to_float64_than_torch_bf16_for_loop(name):
    ours_class, torch_class = PAIRS[name]
    values = fresh_params(torch.bfloat16)
    params, optimizer = build(ours_class, values)
    ref_params, ref_optimizer = build(torch_class, values, foreach=False)
    exact_params, exact_optimizer = build(torch_class, [value.double() for value in values], foreach=False)
    take_steps(params, optimizer, 4, torch.bfloat16, 2.0)
    take_steps(ref_params, ref_optimizer, 4, torch.bfloat16, 2.0, divide_grads=True)
    for step in range(4):  # float64 math on the same bf16 gradients
        for param, grad in zip(exact_params, fresh_grads(torch.bfloat16, step)):
            param.grad = grad.double() / (2.0 * (1 + step))
        for group in exact_optimizer.param_groups:
            group["lr"] = LRS[step]
        exact_optimizer.step()
    assert all(state["exp_avg"].dtype == torch.bfloat16 for state in optimizer.state.values() if state)
    assert_same(params, optimizer, ref_params, ref_optimizer, **TOLERANCES[torch.bfloat16])
    for param, ref_param, exact in zip(params[:3], ref_params[:3], exact_params[:3]):
        ours_rms = (param.double() - exact).pow(2).mean().sqrt()
        torch_rms = (ref_param.double() - exact).pow(2).mean().sqrt()
        assert ours_rms <= 1.01 * torch_rms, (ours_rms, torch_rms)


@pytest.mark.parametrize("decoupled", [True, False])
def test_bf16_kernel_rounds_the_fp32_math_once(decoupled):
    generator = torch.Generator().manual_seed(3)
    tensors = [torch.randn(4099, generator=generator) for _ in range(3)] + [torch.rand(4099, generator=generator)]
    ours = [t.bfloat16() for t in tensors]
    expected = [t.bfloat16() for t in tensors]
    options = dict(step=3, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                   decoupled_weight_decay=decoupled, grad_scale=torch.tensor(1.5))
    adam_step_(*ours, **options)
    adam_step_reference(*expected, **options)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, rtol=2 ** -8, atol=0.0)


def test_strided_tensors_are_updated_in_place():
    generator = torch.Generator().manual_seed(4)
    # param, grad, exp_avg: transposed views; exp_avg_sq non-negative, transposed too
    tensors = [torch.randn(65, 33, generator=generator).t() for _ in range(3)]
    tensors.append(torch.rand(65, 33, generator=generator).t())
    expected = [t.clone() for t in tensors]
    options = dict(step=2, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True)
    adam_step_(*tensors, **options)
    adam_step_reference(*expected, **options)
    assert not tensors[0].is_contiguous()
    for got, want in zip(tensors, expected):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("name", PAIRS)
def test_state_dicts_load_both_ways_and_training_continues_identically(name):
    ours_class, torch_class = PAIRS[name]
    values = fresh_params(torch.float32)
    for first_class, second_class in ((ours_class, torch_class), (torch_class, ours_class)):
        first_params, first = build(first_class, values, foreach=False)
        take_steps(first_params, first, 2, torch.float32, 2.0, divide_grads=first_class is torch_class)
        saved = copy.deepcopy(first.state_dict())  # as a checkpoint: the state dict holds references
        # the second optimizer starts from the first's parameters and state dict
        second_params, second = build(second_class, [p.detach() for p in first_params], foreach=False)
        second.load_state_dict(saved)
        assert set(second.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
        take_steps(first_params, first, 2, torch.float32, 2.0, first_step=2, divide_grads=first_class is torch_class)
        take_steps(second_params, second, 2, torch.float32, 2.0, first_step=2,
                   divide_grads=second_class is torch_class)
        assert_same(second_params, second, first_params, first, **TOLERANCES[torch.float32])
        assert all(group["fused"] is False and group["foreach"] is False for group in second.param_groups)


def test_a_fused_torch_checkpoint_loads_and_runs_the_triton_step():
    values = fresh_params(torch.float32)
    fused_params, fused = build(torch.optim.AdamW, values, fused=True)
    take_steps(fused_params, fused, 1, torch.float32)
    params, optimizer = build(TritonAdamW, [p.detach() for p in fused_params])
    optimizer.load_state_dict(fused.state_dict())
    assert all(group["fused"] is False for group in optimizer.param_groups)
    take_steps(params, optimizer, 1, torch.float32, first_step=1)
    assert all(state["step"].item() == 2 and state["step"].device.type == "cpu" for state in optimizer.state.values())


@pytest.mark.parametrize("name", PAIRS)
def test_cpu_without_the_interpreter_falls_back_to_torch_step_with_the_clip_applied(name, monkeypatch):
    monkeypatch.setattr(adamw, "triton_available_for", lambda tensor: False)
    monkeypatch.setattr(adamw, "adam_step_", None)  # the kernel must not run
    ours_class, torch_class = PAIRS[name]
    values = fresh_params(torch.float32)
    params, optimizer = build(ours_class, values)
    ref_params, ref_optimizer = build(torch_class, values, foreach=False)
    take_steps(params, optimizer, 4, torch.float32, 3.5)
    take_steps(ref_params, ref_optimizer, 4, torch.float32, 3.5, divide_grads=True)
    assert_same(params, optimizer, ref_params, ref_optimizer, rtol=0.0, atol=0.0)  # torch's own step
    assert float(optimizer.grad_scale) == 3.5 * 4  # put back after the step


@pytest.mark.parametrize("option", ["amsgrad", "maximize", "capturable", "differentiable", "fused", "foreach"])
def test_unsupported_options_raise_at_construction(option):
    with pytest.raises(ValueError, match=option):
        TritonAdamW([torch.nn.Parameter(torch.ones(3))], **{option: True})
    optimizer = TritonAdam([torch.nn.Parameter(torch.ones(3))])
    if option not in ("fused", "foreach"):
        with pytest.raises(ValueError, match=option):
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], option: True})


def test_complex_parameters_and_sparse_gradients_raise():
    with pytest.raises(ValueError, match="complex"):
        TritonAdamW([torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))])
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        TritonAdamW([param]).step()


def test_the_debug_model_trains_with_the_triton_optimizer_as_with_foreach(tmp_path, monkeypatch):
    from tests.helpers import tiny_overrides
    from torchtitan_like.config import load_config
    from torchtitan_like.trainer import Trainer

    monkeypatch.setattr(adamw, "BLOCK", 16384)  # fewer programs: the interpreter's cost is per program

    losses, weights = {}, {}
    for implementation in ("foreach", "triton"):
        config, _ = load_config(tiny_overrides(str(tmp_path / implementation), steps=3) + [
            "--metrics.enable_tensorboard", "false", "--optimizer.implementation", implementation])
        trainer = Trainer(config)
        assert isinstance(trainer.optimizer, TritonAdamW) == (implementation == "triton")
        losses[implementation] = trainer.train()
        weights[implementation] = [p.detach().clone() for p in trainer.model_parts[0].parameters()]
        trainer.close()
    assert len(losses["triton"]) == 3
    # max_norm 1.0 clips every step: in place for foreach, through grad_scale in the kernel for triton
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["foreach"]), rtol=0.0, atol=1e-5)
    for got, want in zip(weights["triton"], weights["foreach"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_run_with_the_triton_optimizer_resumes_bit_for_bit(tmp_path, monkeypatch):
    # A DCP resume first builds the optimizer state with a zero-lr step (torch's _init_optim_state),
    # then loads the saved moments and the step count into it: the kernel's step must leave the
    # weights as they are and the restored CPU step count must drive the next bias corrections.
    from tests.helpers import tiny_overrides
    from torchtitan_like.config import load_config
    from torchtitan_like.trainer import Trainer

    monkeypatch.setattr(adamw, "BLOCK", 16384)

    def run(folder: str, steps: int) -> tuple[list[float], list[torch.Tensor]]:
        config, _ = load_config(tiny_overrides(str(tmp_path / folder), steps=steps) + [
            "--metrics.enable_tensorboard", "false", "--optimizer.implementation", "triton",
            "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.last_save_model_only", "false"])
        trainer = Trainer(config)
        assert isinstance(trainer.optimizer, TritonAdamW)
        losses = trainer.train()
        weights = [p.detach().clone() for p in trainer.model_parts[0].parameters()]
        trainer.close()
        return losses, weights

    straight_losses, straight_weights = run("straight", 4)
    # A run stopped after step 2 (a shorter run would have another LR schedule): its checkpoint.
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2")
    resumed_losses, resumed_weights = run("resumed", 4)  # resumes from step 2
    assert resumed_losses == straight_losses
    for got, want in zip(resumed_weights, straight_weights):
        assert torch.equal(got, want)


def test_dtensor_parameters_update_their_local_shards_like_torch():
    from tests.helpers import launch

    output = launch([os.path.abspath(__file__)], 2, timeout=180)
    assert "rank 0 dtensor states True, matches torch True" in output, output
    assert "rank 1 dtensor states True, matches torch True" in output, output


def _dtensor_worker() -> None:
    """2 gloo ranks, 3 steps of TritonAdamW and torch's AdamW: a Shard(0) and a Replicate parameter,
    and two whose gradient arrives in another layout, as under pure tensor parallel: the
    vocab-sharded embedding's gradient replicated, a sequence-parallel norm's a partial sum."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (2,))
    values = fresh_params(torch.float32)[:2] + fresh_params(torch.float32, seed=1)[:2]
    placements = [[Shard(0)], [Replicate()], [Shard(0)], [Replicate()]]

    def gradient_as_it_arrives(index, grad):
        if index == 2:
            return distribute_tensor(grad, mesh, [Replicate()])
        if index == 3:  # the ranks' shares sum to the gradient
            share = grad * (dist.get_rank() + 1) / 3
            return DTensor.from_local(share, mesh, [Partial()], run_check=False)
        return distribute_tensor(grad, mesh, placements[index])

    def build_dtensors(optimizer_class, **kwargs):
        params = [torch.nn.Parameter(distribute_tensor(v.clone(), mesh, p)) for v, p in zip(values, placements)]
        return params, optimizer_class(params, lr=1e-2, betas=BETAS, weight_decay=WEIGHT_DECAY, **kwargs)

    params, optimizer = build_dtensors(TritonAdamW)
    ref_params, ref_optimizer = build_dtensors(torch.optim.AdamW, foreach=False)
    for step in range(3):
        grads = fresh_grads(torch.float32, step)[:2] + fresh_grads(torch.float32, step + 10)[:2]
        for index, (param, grad) in enumerate(zip(params, grads)):
            param.grad = gradient_as_it_arrives(index, grad)
        for param, grad, placement in zip(ref_params, grads, placements):  # the reference: the parameter's layout
            param.grad = distribute_tensor(grad, mesh, placement)
        optimizer.grad_scale = torch.tensor(2.0)
        optimizer.step()
        for param in ref_params:
            param.grad.div_(2.0)
        ref_optimizer.step()
    dtensor_states = all(hasattr(optimizer.state[p]["exp_avg"], "placements") for p in params)
    matches = all(torch.allclose(p.full_tensor(), r.full_tensor(), **TOLERANCES[torch.float32])
                  for p, r in zip(params, ref_params))
    print(f"rank {dist.get_rank()} dtensor states {dtensor_states}, matches torch {matches}", flush=True)
    # Both ranks leave together: a rank still inside gloo when its peer tears down can abort
    # ("terminate called without an active exception", seen once in CI).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _dtensor_worker()
