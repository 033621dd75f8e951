"""Split master weights (torchtitan_like/master_weights.py): bf16 parameters plus int16 remainders
that form the fp32 master exactly, updated by the Triton AdamW/Adam step (kernels/adamw.py, under the
Triton interpreter here), saved and resumed as fp32.

The reference everywhere is what FSDP's bf16 mixed precision does on one rank: an fp32 master, a
bf16 copy of it for the forward and backward, the bf16 gradients taken as fp32 by the optimizer. The
split path must give the same losses and the same fp32 masters bit for bit; the only rounding that
differs from torch's cast (ties of the low 16 bits, away from zero instead of to even) is used by the
reference too (`master_weights.split`).
"""

import copy
import os
import shutil

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from torchtitan_like import master_weights  # noqa: E402
from torchtitan_like.errors import ConfigError  # noqa: E402
from torchtitan_like.kernels import adamw  # noqa: E402
from torchtitan_like.kernels.adamw import TritonAdam, TritonAdamW, adam_step_  # noqa: E402

STEP = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def special_values() -> torch.Tensor:
    """Random values over 60 decades, exact ties of the low half, and zeros, infinities, extremes."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    spread = torch.randn(20_000, generator=generator) * torch.logspace(-30, 30, 20_000)
    high_bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (2_000,), generator=generator, dtype=torch.int64)
    ties = ((high_bits & ~0xFFFF) | 0x8000).to(torch.int32).view(torch.float32)
    ties = ties[~torch.isnan(ties)]
    edges = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, 1.0, -1.0])
    return torch.cat([spread, ties, edges])


def test_split_and_join_are_exact_inverses_and_the_high_half_rounds_to_nearest():
    values = special_values()
    high, low = master_weights.split(values)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and high.shape == low.shape == values.shape
    assert torch.equal(master_weights.join(high, low).view(torch.int32), values.view(torch.int32))
    # nearest: within half a bf16 ulp; torch's cast (ties to even) agrees except on exact ties
    differs = high.view(torch.int16) != values.to(torch.bfloat16).view(torch.int16)
    assert ((values.view(torch.int32)[differs] & 0xFFFF) == 0x8000).all()
    finite = torch.isfinite(high.float()) & torch.isfinite(values)
    ulp = (high.float().abs() * 2 ** -7).clamp_min(2 ** -133)
    assert ((high.float() - values).abs()[finite] <= ulp[finite] / 2).all()
    nan_high, nan_low = master_weights.split(torch.tensor([float("nan"), 1.5]))
    assert torch.isnan(nan_high[0]) and nan_low[0] == 0 and nan_high[1] == 1.5


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("grad_scale", [None, 2.5])
def test_the_kernel_updates_the_exact_fp32_master(decoupled, grad_scale):
    """Three steps on split halves = three steps of the fp32 kernel on the joined value, to the bit."""
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    master = torch.randn(3001, generator=generator)
    high, low = master_weights.split(master)
    high, low = high.clone(), low.clone()
    moments = [torch.zeros(3001) for _ in range(4)]
    scale = None if grad_scale is None else torch.tensor(grad_scale)
    for step in range(1, 4):
        grad = torch.randn(3001, generator=generator).bfloat16()
        adam_step_(high, grad, moments[0], moments[1], step=step, decoupled_weight_decay=decoupled,
                   grad_scale=scale, low=low, **STEP)
        adam_step_(master, grad.float(), moments[2], moments[3], step=step, decoupled_weight_decay=decoupled,
                   grad_scale=scale, **STEP)
    assert torch.equal(master_weights.join(high, low).view(torch.int32), master.view(torch.int32))
    assert torch.equal(high, master_weights.split(master)[0])
    assert torch.equal(moments[0], moments[2]) and torch.equal(moments[1], moments[3])


def test_without_the_interpreter_the_plain_torch_step_updates_both_halves(monkeypatch):
    """CPU without Triton: the reference math on the joined value (torch's own steps would update
    the bf16 halves alone); within two fp32 ulps of the kernel (its sqrt is IEEE, torch's CPU one not)."""
    generator = torch.Generator().manual_seed(3)
    values = [torch.randn(515, generator=generator), torch.randn(7, 9, generator=generator)]
    results = {}
    for kernel in (True, False):
        if not kernel:
            monkeypatch.setattr(adamw, "triton_available_for", lambda tensor: False)
        params = [torch.nn.Parameter(value.clone()) for value in values]
        module = torch.nn.ParameterList(params)
        master_weights.convert_to_split([module])
        optimizer = TritonAdamW(list(module), lr=1e-2, weight_decay=0.1)
        for step in range(3):
            for param in module:
                param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step)).bfloat16()
            optimizer.grad_scale = torch.tensor(1.5)
            optimizer.step()
        results[kernel] = [master_weights.master_value(param) for param in module]
    for got, want in zip(results[False], results[True]):
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-9)


def tiny_model(tie: bool = False):
    from torchtitan_like.models.llama3.args import Llama3Args
    from torchtitan_like.models.llama3.model import Transformer

    args = Llama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=32,
                      tie_word_embeddings=tie)
    model = Transformer(args)
    model.init_weights(seed=0)
    return model


def test_training_on_split_halves_equals_fp32_masters_with_a_bf16_model_copy(monkeypatch):
    """Forward and backward run on the bf16 halves, the optimizer updates the fp32 master exactly:
    losses and masters equal, to the bit, FSDP-style mixed precision kept by hand."""
    import copy

    monkeypatch.setattr(adamw, "BLOCK", 16384)  # fewer programs: the interpreter's cost is per program
    split_model = tiny_model()
    reference_model = copy.deepcopy(split_model)
    masters = [param.detach().clone() for param in reference_model.parameters()]
    assert master_weights.convert_to_split([split_model]) == len(masters)
    assert all(param.dtype == torch.bfloat16 for param in split_model.parameters())
    split_optimizer = TritonAdamW(list(split_model.parameters()), lr=3e-3, weight_decay=0.1)
    master_params = [torch.nn.Parameter(master) for master in masters]
    reference_optimizer = TritonAdamW(master_params, lr=3e-3, weight_decay=0.1)
    for param in reference_model.parameters():  # parameters only, as FSDP's policy (RoPE's buffer stays fp32)
        param.data = param.data.to(torch.bfloat16)

    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    for step in range(4):
        tokens = torch.randint(0, 96, (2, 17), generator=generator)
        split_optimizer.zero_grad()
        split_loss = torch.nn.functional.cross_entropy(split_model(tokens[:, :-1]).flatten(0, 1).float(),
                                                       tokens[:, 1:].flatten())
        split_loss.backward()
        split_optimizer.step()

        with torch.no_grad():
            for param, master in zip(reference_model.parameters(), master_params):
                param.copy_(master_weights.split(master)[0])
        reference_model.zero_grad()
        reference_loss = torch.nn.functional.cross_entropy(
            reference_model(tokens[:, :-1]).flatten(0, 1).float(), tokens[:, 1:].flatten())
        reference_loss.backward()
        for param, master in zip(reference_model.parameters(), master_params):
            master.grad = param.grad.float()
        reference_optimizer.step()
        assert torch.equal(split_loss, reference_loss), f"step {step}: {split_loss.item()} != {reference_loss.item()}"
    for param, master in zip(split_model.parameters(), master_params):
        assert torch.equal(master_weights.master_value(param), master)
        assert split_optimizer.state[param]["exp_avg"].dtype == torch.float32


def test_tied_parameters_stay_tied_and_a_state_dict_holds_the_fp32_masters():
    from torchtitan_like.checkpoint.state import ModelState

    model = tiny_model(tie=True)
    before = {name: value.clone() for name, value in ModelState([model]).state_dict().items()}
    master_weights.convert_to_split([model])
    assert model.output.weight is model.tok_embeddings.weight
    saved = ModelState([model]).state_dict()
    assert saved.keys() == before.keys()
    for name, value in saved.items():
        assert value.dtype == before[name].dtype and torch.equal(value, before[name]), name

    # an fp32 checkpoint (any master_weights) loads into both halves; a float32 model loads the masters
    fresh = tiny_model(tie=True)
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(torch.randn_like(param) * 1e-3)  # masters with non-zero low halves
    wanted = ModelState([fresh]).state_dict()
    master_weights.convert_to_split([model])  # nothing left to split: a no-op
    ModelState([model]).load_state_dict({name: value.clone() for name, value in wanted.items()})
    for name, value in ModelState([model]).state_dict().items():
        assert torch.equal(value, wanted[name]), name
    plain = tiny_model(tie=True)
    ModelState([plain]).load_state_dict(ModelState([model]).state_dict())
    for name, value in ModelState([plain]).state_dict().items():
        assert torch.equal(value, wanted[name]), name


@pytest.mark.parametrize("optimizer_class", [TritonAdamW, TritonAdam])
def test_optimizer_state_dicts_keep_fp32_moments_for_split_parameters(optimizer_class):
    # torch's load_state_dict casts state to the parameter's dtype: bf16 here, which would round the moments
    def build():
        module = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(33, 17, generator=torch.Generator().manual_seed(1)))])
        master_weights.convert_to_split([module])
        return module, optimizer_class(list(module), lr=1e-2)

    module, optimizer = build()
    for step in range(2):
        module[0].grad = torch.randn(33, 17, generator=torch.Generator().manual_seed(10 + step)).bfloat16()
        optimizer.step()
    saved = optimizer.state_dict()
    other_module, other = build()
    other.load_state_dict(saved)
    for name in ("exp_avg", "exp_avg_sq"):
        got, want = other.state[other_module[0]][name], optimizer.state[module[0]][name]
        assert got.dtype == torch.float32 and torch.equal(got, want), name
    assert other.state[other_module[0]]["step"].item() == 2.0


def test_gradient_accumulation_sums_microbatches_in_fp32_and_the_clip_reads_it():
    from torchtitan_like.parallelisms.grad_clip import clip_grad_norm

    model = torch.nn.Linear(16, 8, bias=False)
    master_weights.convert_to_split([model])
    handles = master_weights.accumulate_gradients_in_fp32([model])
    weight = model.weight
    reference = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)  # no hooks: one pass's bf16 gradient
    with torch.no_grad():
        reference.weight.copy_(weight)
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    summed = torch.zeros(8, 16)
    for _ in range(3):
        inputs = torch.randn(4, 16, generator=generator).bfloat16()
        model(inputs).float().square().sum().backward()
        assert weight.grad is None  # moved into main_grad
        reference.weight.grad = None
        reference(inputs).float().square().sum().backward()
        summed += reference.weight.grad.float()
    assert weight.main_grad.dtype == torch.float32 and torch.equal(weight.main_grad, summed)
    norm = clip_grad_norm([weight], 0.0, None, None)
    torch.testing.assert_close(norm, weight.main_grad.norm(), rtol=1e-6, atol=0)

    # the optimizer uses the fp32 sum, and zero_grad clears it
    expected = weight.main_grad.clone()
    optimizer = TritonAdamW([weight], lr=1e-2)
    master_before = master_weights.master_value(weight)
    reference, moment, moment_sq = master_before.clone(), torch.zeros_like(expected), torch.zeros_like(expected)
    adam_step_(reference, expected, moment, moment_sq, step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
               weight_decay=0.01, decoupled_weight_decay=True)
    optimizer.step()
    assert torch.equal(master_weights.master_value(weight), reference)
    optimizer.zero_grad()
    assert getattr(weight, "main_grad", None) is None
    for handle in handles:
        handle.remove()


def test_the_norm_of_bf16_gradients_is_taken_in_fp32():
    from torchtitan_like.parallelisms.grad_clip import clip_grad_norm

    generator = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.zeros(4096, dtype=torch.bfloat16)) for _ in range(3)]
    for param in params:
        param.grad = (torch.randn(4096, generator=generator) * 3).bfloat16()
    norm = clip_grad_norm(params, 0.0, None, None)
    assert norm.dtype == torch.float32
    exact = torch.cat([param.grad.double() for param in params]).norm()
    assert abs(norm.double() - exact) / exact < 1e-6  # a bf16 norm would be ~3e-3 off


def test_invalid_combinations_are_config_errors(tmp_path):
    from tests.helpers import tiny_overrides
    from torchtitan_like.config import load_config, validate_config
    from torchtitan_like.parallelisms.parallel_dims import ParallelDims
    from torchtitan_like.startup import resolve_model_args
    from torchtitan_like.data import build_tokenizer

    def config_with(*overrides):
        config, _ = load_config(tiny_overrides(str(tmp_path)) + ["--training.master_weights", "split", *overrides])
        return config

    for overrides, message in (
            (["--training.mixed_precision_param", "float32"], "mixed_precision_param = 'float32'"),
            (["--optimizer.implementation", "fused"], "optimizer.implementation = 'fused'")):
        config = config_with(*overrides)
        _, model_args = resolve_model_args(config, build_tokenizer(config.model))
        with pytest.raises(ConfigError, match=message):
            validate_config(config, model_args)
    config = config_with()
    dims = ParallelDims.from_config(config.parallelism, world_size=2)  # dp_shard -1 -> FSDP over 2
    with pytest.raises(ConfigError, match="one process without FSDP.*this run has 2 \\(dp_shard 2\\)"):
        dims.validate_features(config.parallelism, config.compile, "cpu", master_weights="split")


def test_a_split_run_resumes_bit_for_bit_and_its_checkpoint_resumes_a_float32_run(tmp_path, monkeypatch):
    from tests.helpers import tiny_overrides
    from torchtitan_like.config import load_config
    from torchtitan_like.trainer import Trainer

    # The optimizer's plain-torch path (the kernel's equality with it is tested above): the
    # interpreter's step over the debug model would double the test's time.
    monkeypatch.setattr(adamw, "triton_available_for", lambda tensor: False)

    def run(folder: str, master: str, steps: int = 4):
        config, _ = load_config(tiny_overrides(str(tmp_path / folder), steps=steps) + [
            "--metrics.enable_tensorboard", "false", "--training.master_weights", master,
            "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.last_save_model_only", "false"])
        trainer = Trainer(config)
        assert isinstance(trainer.optimizer, TritonAdamW) == (master == "split")
        assert trainer.split_master_weights == (master == "split")
        losses = trainer.train()
        from torchtitan_like.checkpoint.state import ModelState

        weights = ModelState(trainer.model_parts).state_dict()
        dtypes = {param.dtype for param in trainer.model_parts[0].parameters()}
        trainer.close()
        return losses, weights, dtypes

    straight_losses, straight_weights, dtypes = run("straight", "split")
    assert dtypes == {torch.bfloat16}
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", tmp_path / "resumed" / "checkpoint" / "step-2")
    resumed_losses, resumed_weights, _ = run("resumed", "split")
    assert resumed_losses == straight_losses
    for name, value in resumed_weights.items():
        assert value.dtype == torch.float32 and torch.equal(value, straight_weights[name]), name

    # the same checkpoint resumes a float32 run from the same fp32 masters (its step-3 loss is
    # computed in fp32 on CPU, so it is close to the split run's, not equal)
    shutil.copytree(tmp_path / "straight" / "checkpoint" / "step-2", tmp_path / "fp32" / "checkpoint" / "step-2")
    fp32_losses, _, fp32_dtypes = run("fp32", "float32")
    assert fp32_dtypes == {torch.float32}
    assert fp32_losses[:2] == straight_losses[:2]  # the saved history of the first two steps
    assert abs(fp32_losses[2] - straight_losses[2]) < 0.05


def test_zero_grad_without_set_to_none_steps_a_parameter_without_gradient_as_without_accumulation():
    """zero_grad(set_to_none=False) keeps zeroed gradients, so torch's optimizers still step a
    parameter that gets no gradient (its momentum moves it). With the fp32 accumulation the hook has
    freed `.grad`: `main_grad` must be zeroed, not dropped, or that parameter silently stops."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"first": torch.nn.Linear(8, 8, bias=False),
                                 "second": torch.nn.Linear(8, 8, bias=False)})
    inputs = torch.randn(4, 8).bfloat16()
    results = []
    for accumulate in (False, True):
        module = copy.deepcopy(model)
        master_weights.convert_to_split([module])
        if accumulate:
            master_weights.accumulate_gradients_in_fp32([module])
        optimizer = TritonAdamW(list(module.parameters()), lr=0.1, weight_decay=0.1)
        for step in range(3):
            optimizer.zero_grad(set_to_none=False)
            hidden = module["first"](inputs)
            if step == 0:  # the second layer takes part in the first step only
                hidden = module["second"](hidden)
            hidden.float().square().sum().backward()
            optimizer.step()
        second = module["second"].weight
        if accumulate:
            optimizer.zero_grad(set_to_none=False)
            main_grad = getattr(second, "main_grad", None)
            assert main_grad is not None and main_grad.dtype == torch.float32 and not main_grad.any()
        results.append((master_weights.master_value(second), optimizer.state[second]["step"].item()))
    (plain_value, plain_steps), (accumulated_value, accumulated_steps) = results
    assert plain_steps == accumulated_steps == 3
    assert torch.equal(accumulated_value, plain_value)
