"""Float8Linear (kernels/float8/linear.py), the module swap and device check (convert.py), and a
short Llama training run with emulated float8 against the same run in high precision."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the kernels on CPU

import copy
import functools

import pytest
import torch
import torch.nn as nn

from torchtitan_like.config.job_config import Float8
from torchtitan_like.errors import ConfigError
from torchtitan_like.kernels.float8 import Float8Linear, check_float8_support, convert_to_float8
from torchtitan_like.kernels.float8 import float8_linear_reference
from torchtitan_like.kernels.float8 import quantize as q

# Same quantized operands in both: only fp32 summation order and 1/scale rounding differ.
KERNEL_VS_REFERENCE = 1e-4
# Against high precision the error is fp8 rounding: e4m3 has 3 mantissa bits (<= 6% per element),
# e5m2 2 bits (<= 12.5%); norms of GEMM outputs average that down to a few percent.
FORWARD_VS_HIGH_PRECISION = 0.06
GRAD_VS_HIGH_PRECISION = 0.12


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(q, "POISON_OUTPUTS", True)


def _relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _run(layer, x, grad_output):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad_output)
    return y.detach(), x.grad, layer.weight.grad


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("backend,emulate", [("triton", False), ("auto", True)])
def test_float8_linear_matches_emulated_reference(recipe, backend, emulate):
    layer = Float8Linear(32, 48, bias=False, recipe=recipe, backend=backend, emulate=emulate)
    x, grad_output = torch.randn(2, 9, 32), torch.randn(2, 9, 48)
    y, dx, dw = _run(layer, x, grad_output)
    ref_y, ref_dx, ref_dw = float8_linear_reference(x, layer.weight.detach(), grad_output, recipe)
    assert y.shape == (2, 9, 48) and dx.shape == x.shape and dw.shape == layer.weight.shape
    for actual, expected in ((y.reshape(-1, 48), ref_y), (dx.reshape(-1, 32), ref_dx), (dw, ref_dw)):
        assert _relative_error(actual, expected) < KERNEL_VS_REFERENCE


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_linear_close_to_high_precision_linear(recipe):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=True)
    fp8 = Float8Linear.from_linear(copy.deepcopy(linear), recipe=recipe, emulate=True)
    x, grad_output = torch.randn(4, 16, 64), torch.randn(4, 16, 96)
    y, dx, dw = _run(fp8, x, grad_output)
    ref_y, ref_dx, ref_dw = _run(linear, x, grad_output)
    assert _relative_error(y, ref_y) < FORWARD_VS_HIGH_PRECISION
    assert _relative_error(dx, ref_dx) < GRAD_VS_HIGH_PRECISION
    assert _relative_error(dw, ref_dw) < GRAD_VS_HIGH_PRECISION
    assert torch.equal(fp8.bias.grad, linear.bias.grad)


def test_bf16_input_gives_bf16_output_and_fp32_weight_grad():
    layer = Float8Linear(32, 16, bias=False, recipe="tensorwise", backend="triton")
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and layer.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("backend,emulate", [("triton", False), ("auto", True)])
def test_saving_the_fp8_weight_gives_the_same_bits_without_the_weight(backend, emulate):
    torch.manual_seed(0)
    plain = Float8Linear(32, 48, bias=False, recipe="tensorwise", backend=backend, emulate=emulate)
    saving = Float8Linear(32, 48, bias=False, recipe="tensorwise", backend=backend, emulate=emulate,
                          save_fp8_weight=True)
    saving.weight = nn.Parameter(plain.weight.detach().clone())
    x, grad_output = torch.randn(2, 9, 32), torch.randn(2, 9, 48)
    for name, actual, expected in zip(("y", "dx", "dW"), _run(saving, x, grad_output), _run(plain, x, grad_output)):
        assert torch.equal(actual, expected), name
    # What backward holds: the forward's fp8 W^T (K, N) instead of the weight itself.
    # (torch 2.11 frees a node's saved tensors with its output: keep the outputs alive)
    outputs = {layer: layer(x) for layer in (plain, saving)}
    saved = {layer: y.grad_fn.next_functions[0][0].saved_tensors for layer, y in outputs.items()}  # under the reshape
    assert any(t is plain.weight or t.data_ptr() == plain.weight.data_ptr() for t in saved[plain])
    fp8_shapes = {layer: sorted(tuple(t.shape) for t in saved[layer] if t.dtype == q.E4M3) for layer in saved}
    assert fp8_shapes[plain] == [(32, 18)] and fp8_shapes[saving] == [(32, 18), (32, 48)]  # x^T; x^T and W^T
    assert all(t.data_ptr() != saving.weight.data_ptr() for t in saved[saving])


def test_convert_chooses_when_to_save_fp8_weights():
    def saves(weights_sharded, **options):
        model = _Toy()
        convert_to_float8(model, Float8(enable=True, emulate=True, **options), weights_sharded=weights_sharded)
        return model.block["w1"].save_fp8_weight

    assert saves(False) and not saves(True)  # auto: only when FSDP does not free the weight after forward
    assert saves(True, save_fp8_weight="always") and not saves(False, save_fp8_weight="never")
    assert not saves(False, recipe_name="rowwise")  # its backward casts W per column: nothing to reuse
    with pytest.raises(ConfigError, match="save_fp8_weight"):
        saves(False, recipe_name="rowwise", save_fp8_weight="always")


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({"w1": nn.Linear(32, 64, bias=False), "odd": nn.Linear(30, 64)})
        self.output = nn.Linear(64, 48, bias=False)


def test_convert_swaps_eligible_linears_and_keeps_parameters(caplog):
    model = _Toy()
    params_before = dict(model.named_parameters())
    config = Float8(enable=True, emulate=True, recipe_name="rowwise")
    with caplog.at_level("INFO", logger="torchtitan_like"):
        swapped = convert_to_float8(model, config)
    assert swapped == 1
    assert isinstance(model.block["w1"], Float8Linear) and model.block["w1"].recipe == "rowwise"
    assert type(model.block["odd"]) is nn.Linear and type(model.output) is nn.Linear
    params_after = dict(model.named_parameters())
    assert params_after.keys() == params_before.keys()
    assert all(params_after[name] is params_before[name] for name in params_before)
    assert "block.odd" in caplog.text and "output" in caplog.text
    assert convert_to_float8(model, config) == 0  # already converted: nothing left to swap
    assert convert_to_float8(_Toy(), Float8(enable=False)) == 0


def test_check_float8_support_errors(monkeypatch):
    check_float8_support("cpu", Float8(enable=True, emulate=True))
    check_float8_support("cpu", Float8(enable=False))
    check_float8_support("cpu", Float8(enable=True, backend="triton"))  # interpreter tests
    with pytest.raises(ConfigError, match="emulate"):
        check_float8_support("cpu", Float8(enable=True, backend="auto"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ConfigError, match="8.9"):
        check_float8_support("cuda", Float8(enable=True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_float8_support("cuda", Float8(enable=True))


@functools.lru_cache(maxsize=None)
def _train_losses(recipe, steps=20):
    """Losses of 20 AdamW steps on one fixed batch of random tokens (the model memorizes it);
    recipe None trains in high precision. Same init (init_weights(seed=0)) and data for every run."""
    from torchtitan_like.models.llama3 import Transformer, get_flavor

    args = get_flavor("debugmodel")
    args.vocab_size, args.n_layers, args.max_seq_len = 258, 2, 64
    model = Transformer(args)
    model.init_weights(seed=0)
    if recipe is not None:
        config = Float8(enable=True, emulate=True, recipe_name=recipe)
        assert convert_to_float8(model, config) == 2 * 7  # wq wk wv wo w1 w2 w3 per layer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: extra threads only add contention on a shared CPU
    try:
        return _train(model, optimizer, steps)
    finally:
        torch.set_num_threads(threads)


def _train(model, optimizer, steps):
    tokens = torch.randint(0, 258, (4, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 258), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tuple(losses)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_llama_training_with_emulated_float8_tracks_high_precision(recipe):
    baseline, float8 = _train_losses(None), _train_losses(recipe)
    assert float8[-1] < 0.7 * float8[0]
    # Every step's loss within 5% relative of the high-precision run from the same init.
    for step, (ours, reference) in enumerate(zip(float8, baseline)):
        assert abs(ours - reference) <= 0.05 * reference, (step, float8, baseline)


@pytest.mark.parametrize("recipe,save_fp8_weight", [("tensorwise", False), ("tensorwise", True), ("rowwise", False)])
def test_compiled_float8_linear_has_the_eager_gradients(recipe, save_fp8_weight):
    # torch 2.11's Dynamo zeroed every gradient when the autograd.Function returned an alias made
    # by a no-op .to() (emulated GEMM in fp32): the loss then barely moved under torch.compile.
    torch.manual_seed(0)
    layer = Float8Linear(64, 32, bias=False, recipe=recipe, emulate=True, save_fp8_weight=save_fp8_weight)
    x, grad_output = torch.randn(4, 64), torch.randn(4, 32)
    eager = _run(layer, x, grad_output)
    layer.weight.grad = None
    compiled = _run(torch.compile(layer, backend="aot_eager", fullgraph=True), x, grad_output)
    for name, actual, expected in zip(("y", "dx", "dW"), compiled, eager):
        assert expected.norm() > 0
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6, msg=name)


def test_per_op_checkpointing_saves_the_triton_fp8_gemms(recipe="tensorwise"):
    # The Triton GEMM is an operator (torchtitan_like::fp8_scaled_mm), so the per-op policy keeps its
    # output like a matmul's: backward runs the GEMMs it runs without checkpointing, full AC more.
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    from torchtitan_like.models.llama3 import Transformer, get_flavor
    from torchtitan_like.parallelisms.activation_checkpoint import apply_activation_checkpointing

    class CountGemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[func.name()] += 1
            return func(*args, **(kwargs or {}))

    args = get_flavor("debugmodel")
    args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.multiple_of = 64, 32, 1, 2, 1, 16
    tokens = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(0))
    gemms = {}
    for mode, option in (("none", "1"), ("full", "1"), ("selective", "op")):
        model = Transformer(args)
        model.init_weights(seed=0)
        convert_to_float8(model, Float8(enable=True, recipe_name=recipe, backend="triton"))
        apply_activation_checkpointing(model.layers, mode, option)
        loss = model(tokens).float().mean()
        with CountGemms() as counter:
            loss.backward()
        gemms[mode] = counter.counts["torchtitan_like::fp8_scaled_mm"]
    assert gemms["none"] > 0 and gemms["full"] > gemms["none"]
    assert gemms["selective"] == gemms["none"]


def test_compiled_llama_block_casts_the_shared_inputs_of_qkv_and_w1_w3_once(monkeypatch, recipe="tensorwise"):
    # The casts are custom ops (cast_ops.py), so the partitioner's CSE merges the casts of one input
    # by sibling linears: q/k/v read the attention norm's output, w1/w3 the FFN norm's. Eager casts
    # it per linear. The merged run must give the eager block's outputs and gradients. (Rowwise merges
    # its forward and wgrad casts the same way; checked once by hand, 24 s of interpreter time in CI.)
    from torchtitan_like.models.llama3 import Transformer, get_flavor

    args = get_flavor("debugmodel")
    args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.multiple_of = 64, 32, 1, 2, 1, 16
    model = Transformer(args)
    model.init_weights(seed=0)
    convert_to_float8(model, Float8(enable=True, recipe_name=recipe, backend="triton"))
    block = model.layers["0"]
    x = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    rope = model.rope_cache[:16]

    counts = {}

    def counted(name):
        original = getattr(q, name)

        def wrapper(t, *args, **kwargs):
            if kwargs.get("scale") is None:  # a cast that computes its scale (not the weight re-cast)
                counts[name] = counts.get(name, 0) + 1
            return original(t, *args, **kwargs)
        return wrapper

    for name in ("tensorwise_quantize", "rowwise_quantize", "colwise_quantize_t"):
        monkeypatch.setattr(q, name, counted(name))

    def run(fn):
        counts.clear()
        block.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_(True)
        out = fn(inp, rope)
        out.float().pow(2).mean().backward()
        grads = [p.grad.clone() for p in block.parameters()]
        return dict(counts), out.detach(), inp.grad, grads

    eager_counts, *eager = run(block)
    compiled_counts, *compiled = run(torch.compile(block, backend="aot_eager_decomp_partition", fullgraph=True))
    # Casts that compute a scale: 7 inputs, 7 weights, 7 gradients eager; compiled the 7 inputs
    # are 4 distinct tensors (attention norm out, attention out, FFN norm out, SwiGLU out).
    assert eager_counts["tensorwise_quantize"] == 21, eager_counts
    assert compiled_counts["tensorwise_quantize"] == 18, compiled_counts
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-5, atol=1e-6)
    for actual, expected in zip(compiled[2], eager[2]):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
