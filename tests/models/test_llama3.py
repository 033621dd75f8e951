"""Llama 3 model: causality, RoPE, GQA, FFN sizing, flavors and seeded meta-device init."""

import math

import pytest
import torch
import torch.nn.functional as F

from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Transformer, get_flavor
from torchtitan_like.models.llama3.model import apply_rope, repeat_kv, rope_cos_sin, rope_frequencies


def tiny_args(**overrides):
    args = get_flavor("debugmodel")
    args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads = 64, 64, 2, 4, 2
    args.max_seq_len = 64
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build(args, seed=0):
    model = Transformer(args)
    model.init_weights(seed)
    return model


def test_changing_a_future_token_changes_no_earlier_logit():
    model = build(tiny_args())
    tokens = torch.randint(0, 64, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.equal(before[:, :10], after[:, :10])
    assert not torch.allclose(before[:, 10:], after[:, 10:])


def test_rope_matches_complex_multiplication_reference():
    args = tiny_args(rope_scaling=None)
    batch, seq, heads, head_dim = 2, 12, 3, args.head_dim
    x = torch.randn(batch, seq, heads, head_dim, dtype=torch.float64)
    freqs = rope_frequencies(args)
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), freqs)
    rotation = torch.polar(torch.ones_like(angles), angles)  # exp(j * pos * freq)
    as_complex = torch.view_as_complex(x.reshape(batch, seq, heads, head_dim // 2, 2).contiguous())
    expected = torch.view_as_real(as_complex * rotation[None, :, None, :]).reshape_as(x)
    got = apply_rope(x.float(), rope_cos_sin(args, seq)).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_llama31_rope_scaling_slows_only_long_wavelengths():
    base, scaled = get_flavor("8B"), get_flavor("8B")
    base.rope_scaling = None
    plain, stretched = rope_frequencies(base), rope_frequencies(scaled)
    assert torch.equal(plain[:10], stretched[:10])  # high frequencies (short wavelengths) kept
    torch.testing.assert_close(stretched[-1], plain[-1] / 8.0)  # the longest wavelengths slowed 8x


def test_grouped_query_attention_equals_explicitly_repeated_kv_heads():
    gqa_args = tiny_args(n_heads=4, n_kv_heads=2)
    mha_args = tiny_args(n_heads=4, n_kv_heads=4)
    gqa, mha = build(gqa_args), build(mha_args)
    state = gqa.state_dict()
    head_dim = gqa_args.head_dim
    for layer in range(gqa_args.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{layer}.attention.{name}.weight"
            weight = state[key].view(2, head_dim, -1)  # (kv_heads, head_dim, dim)
            state[key] = weight.repeat_interleave(2, dim=0).reshape(4 * head_dim, -1)
    mha.load_state_dict(state)
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(gqa(tokens), mha(tokens), rtol=1e-5, atol=1e-5)


def test_repeat_kv_repeats_each_head_consecutively():
    x = torch.randn(1, 3, 2, 4)
    repeated = repeat_kv(x, 3)
    assert repeated.shape == (1, 3, 6, 4)
    assert torch.equal(repeated[:, :, 0], x[:, :, 0]) and torch.equal(repeated[:, :, 2], x[:, :, 0])
    assert torch.equal(repeated[:, :, 3], x[:, :, 1])


def test_meta_device_init_equals_direct_init():
    args = tiny_args()
    direct = build(args, seed=7)
    with torch.device("meta"):
        meta = Transformer(args)
    meta.to_empty(device="cpu")
    meta.init_weights(7)
    for (name, a), (_, b) in zip(direct.state_dict().items(), meta.state_dict().items()):
        assert torch.equal(a, b), name
    torch.testing.assert_close(meta.rope_cache, direct.rope_cache)
    other = build(args, seed=8)
    assert not torch.equal(other.layers["0"].attention.wq.weight, direct.layers["0"].attention.wq.weight)


def test_init_is_depth_scaled():
    model = build(tiny_args(n_layers=4, dim=256, n_heads=4, n_kv_heads=2))
    std_first = model.layers["0"].attention.wo.weight.std().item()
    std_last = model.layers["3"].attention.wo.weight.std().item()
    assert std_first == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert std_last == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))


@pytest.mark.parametrize("flavor,hidden", [("1B", 8192), ("3B", 8192), ("8B", 14336), ("70B", 28672), ("405B", 53248)])
def test_ffn_width_follows_llama3_rule(flavor, hidden):
    assert get_flavor(flavor).ffn_hidden_dim == hidden


@pytest.mark.parametrize("flavor,billions", [("1B", 1.24), ("3B", 3.21), ("8B", 8.03), ("70B", 70.55), ("405B", 405.85)])
def test_published_parameter_counts(flavor, billions):
    args = get_flavor(flavor)
    args.vocab_size = 128256
    assert args.num_params() / 1e9 == pytest.approx(billions, rel=0.005)


def test_flops_per_token_is_six_non_embedding_params_plus_the_attention_term():
    # TorchTitan's 6N + 12 L H Dh T with N the parameters minus the embedding lookup (Llama 3.1 8B).
    untied = get_flavor("8B")
    untied.vocab_size = 128256
    assert untied.flops_per_token(8192) == 6 * (8_030_261_248 - 128256 * 4096) + 12 * 32 * 32 * 128 * 8192
    # Tied (Llama 3.2 1B): the one matrix is also the LM head, whose matmul is counted.
    tied = get_flavor("1B")
    tied.vocab_size = 128256
    assert tied.flops_per_token(8192) == 6 * 1_235_814_400 + 12 * 16 * 32 * 64 * 8192


def test_parameter_count_formula_matches_module_and_tied_embeddings_share_storage():
    args = tiny_args(tie_word_embeddings=True)
    model = build(args)
    assert sum(p.numel() for p in model.parameters()) == args.num_params()
    assert model.output.weight is model.tok_embeddings.weight


def test_untied_initial_loss_is_near_uniform():
    vocab = 512
    model = build(tiny_args(dim=256, vocab_size=vocab))
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).item()
    # logits of std ~1 add about var/2 = 0.5 to ln V
    assert abs(loss - math.log(vocab)) < 1.0, loss


def test_tied_embedding_takes_the_output_heads_init():
    # The tied matrix is also the LM head. With the embedding's std-1 init, the head's logit of the
    # input token itself (the normed hidden state still points along its embedding at init) would be
    # about dim, and the first loss in the hundreds; with the head's std dim**-0.5 (what TorchTitan's
    # tied models end up with) it is about sqrt(dim).
    vocab, dim = 512, 256
    model = build(tiny_args(dim=dim, vocab_size=vocab, tie_word_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    assert abs(model.output.weight.std().item() * dim ** 0.5 - 1.0) < 0.1
    tokens = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).item()
    assert loss < math.log(vocab) + dim ** 0.5, loss


def test_gradients_flow_to_every_parameter():
    model = build(tiny_args())
    tokens = torch.randint(0, 64, (2, 8))
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_all_flavors_build_on_meta():
    for name in LLAMA3_FLAVORS:
        args = get_flavor(name)
        args.vocab_size = 128256
        with torch.device("meta"):
            model = Transformer(args)
        assert sum(p.numel() for p in model.parameters()) == args.num_params()


def attention_kernels_in_compiled_code(args) -> str:
    """Inductor's generated code of one compiled attention layer's forward (CPU; inference, as the
    kernel choice is the same in training and a cold compile of backward too doubles the time)."""
    from torch._inductor.utils import run_and_get_code

    from torchtitan_like.models.llama3.model import Attention

    torch._dynamo.reset()
    attention = Attention(args)
    compiled = torch.compile(attention, fullgraph=True)
    x = torch.randn(1, 16, args.dim)
    # Without the pattern matcher: it would fuse the math backend's softmax(QK^T)V back into one
    # attention op, which then runs the CPU flash kernel whatever was chosen.
    with torch._inductor.config.patch(pattern_matcher=False), torch.no_grad():
        _, codes = run_and_get_code(lambda: compiled(x, rope_cos_sin(args, 16)))
    return "\n".join(codes)


def test_the_configured_attention_kernel_is_the_one_torch_compile_runs():
    """The choice is made inside the forward, so it is part of the compiled graph and of the compile
    cache's key. (An `sdpa_kernel` entered around the compiled call is not: a graph cached under
    another choice, here the default one compiled first, would be reused.)"""
    default = attention_kernels_in_compiled_code(tiny_args())
    math_only = attention_kernels_in_compiled_code(tiny_args(sdpa_backends=("math",)))
    assert "_scaled_dot_product_flash_attention_for_cpu" in default
    assert "_scaled_dot_product_flash_attention_for_cpu" not in math_only
    # The math backend's softmax(QK^T)V: batched matmuls in the generated code instead.
    assert "bmm" in math_only


def test_the_attention_kernel_choice_leaves_the_output_unchanged():
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 16))
    outputs = []
    for backends in ((), ("math",), ("flash", "math")):
        model = build(tiny_args(sdpa_backends=backends))
        with torch.no_grad():
            outputs.append(model(tokens))
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[2], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backends", [(), ("math",)])
def test_grouped_query_attention_in_the_kernel_equals_repeated_kv(backends):
    torch.manual_seed(0)
    tokens = torch.randint(0, 64, (2, 16))
    outputs, grads = [], []
    for native in (False, True):
        model = build(tiny_args(sdpa_backends=backends, sdpa_native_gqa=native))  # 4 heads, 2 KV heads
        logits = model(tokens)
        logits.square().mean().backward()
        outputs.append(logits.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for native_grad, repeated_grad in zip(grads[1], grads[0]):
        torch.testing.assert_close(native_grad, repeated_grad, rtol=1e-4, atol=1e-6)


def test_native_gqa_resolution():
    from torchtitan_like.startup import supports_native_gqa

    assert supports_native_gqa((), torch.device("cpu")) and supports_native_gqa(("math",), torch.device("cpu"))


def test_sdpa_backend_resolution():
    from torchtitan_like.errors import ConfigError
    from torchtitan_like.startup import resolve_sdpa_backends

    cpu = torch.device("cpu")
    assert resolve_sdpa_backends("auto", cpu) == ()
    assert resolve_sdpa_backends("math", cpu) == ("math",)
    with pytest.raises(ConfigError, match="model.sdpa_backend = 'cudnn' has no CPU kernel"):
        resolve_sdpa_backends("cudnn", cpu)


def test_block_causal_attention_computes_each_packed_document_as_if_it_were_alone():
    """Two documents packed into one sample (BOS = 1 starts each): under block_causal the second
    document's logits equal those of the document run alone (RoPE is relative, so its offset in
    the sample does not matter); under causal they do not (it attends to the first document)."""
    first = torch.tensor([1, *range(10, 21)])  # BOS + 11 tokens
    second = torch.tensor([1, *range(30, 42)])  # BOS + 12 tokens
    tail = torch.tensor([50, 51, 52])  # the end of a document cut by the window, before the first BOS
    packed = torch.cat([tail, first, second])[None]
    block_causal = build(tiny_args(attn_mask_type="block_causal", document_start_id=1), seed=3)
    causal = build(tiny_args(), seed=3)
    with torch.no_grad():
        packed_logits = block_causal(packed)
        alone = [block_causal(document[None]) for document in (tail, first, second)]
        causal_logits = causal(packed)
    start = 0
    for document, logits in zip((tail, first, second), alone):
        end = start + len(document)
        torch.testing.assert_close(packed_logits[:, start:end], logits, rtol=1e-5, atol=1e-5)
        start = end
    assert not torch.allclose(causal_logits[:, len(tail):], packed_logits[:, len(tail):], atol=1e-3)
    torch.testing.assert_close(causal_logits[:, :len(tail)], packed_logits[:, :len(tail)])  # nothing before it


def test_block_causal_gradients_do_not_cross_documents():
    model = build(tiny_args(attn_mask_type="block_causal", document_start_id=1))
    tokens = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 10]])
    embedded = model.tok_embeddings(tokens).detach().requires_grad_()
    from torchtitan_like.models.llama3.model import attention_bias, document_mask

    mask = attention_bias(document_mask(tokens, 1), torch.float32)
    h = embedded  # the blocks run on embeddings that are leaves, to read their gradient per position
    for layer in model.layers.values():
        h = layer(h, model.rope_cache, mask)
    model.output(model.norm(h))[0, 4:].sum().backward()  # the second document's logits only
    assert torch.count_nonzero(embedded.grad[0, :4]) == 0
    assert torch.count_nonzero(embedded.grad[0, 4:]) > 0


def test_block_causal_mask_takes_the_autocast_dtype_of_the_attention():
    """Under autocast q/k/v are bf16 while the embedding output is fp32: the additive mask is made in
    bf16 too, so no layer converts it (one copy per layer) before its attention kernel."""
    model = build(tiny_args(attn_mask_type="block_causal", document_start_id=1))
    tokens = torch.tensor([[1, 5, 6, 7, 1, 8, 9, 10]])
    seen = []
    model.layers["0"].attention.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[2].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
    assert seen == [torch.bfloat16] and torch.isfinite(logits).all()
    with torch.no_grad():
        model(tokens)
    assert seen[-1] == torch.float32


def test_block_causal_is_refused_where_its_kernel_takes_no_mask():
    from torchtitan_like.config import load_config
    from torchtitan_like.errors import ConfigError
    from torchtitan_like.startup import check_attention_mask, supports_native_gqa

    config, _ = load_config(["--model.attn_mask_type", "block_causal"])
    check_attention_mask(config, ("flash",), torch.device("cpu"))  # the CPU flash kernel takes a mask
    with pytest.raises(ConfigError, match="model.sdpa_backend = 'flash' does not on CUDA"):
        check_attention_mask(config, ("flash",), torch.device("cuda"))
    # the memory-efficient kernel, which takes a mask on CUDA, has no native GQA: K/V are repeated
    assert not supports_native_gqa((), torch.device("cuda"), masked=True)
