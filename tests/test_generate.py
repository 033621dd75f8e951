"""Sampling: a model trained here reproduces its corpus; the KV cache changes nothing but speed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from torchtitan_like import generate as generate_cli
from torchtitan_like.checkpoint.hf_convert import write_dcp_model
from torchtitan_like.data import ByteTokenizer
from torchtitan_like.generate import filter_top_k, filter_top_p, generate, sample_next_token
from torchtitan_like.models.llama3 import LLAMA3_FLAVORS, Llama3Args, Transformer
from torchtitan_like.models.llama3.generation import KVCache, forward_with_cache

CORPUS = "the quick brown fox jumps over the lazy dog. "
TINY = Llama3Args(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32, max_seq_len=256)


@pytest.fixture(scope="module")
def trained():
    """A tiny Llama trained with AdamW to continue CORPUS from any offset (after BOS, as the CLI
    prompts); about a hundred steps suffice for this periodic text."""
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    args = Llama3Args(**{**TINY.__dict__, "vocab_size": tokenizer.vocab_size})
    model = Transformer(args)
    model.init_weights(seed=0)
    data = torch.tensor(tokenizer.encode_ordinary(CORPUS * 20))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    window, batch = 48, 8
    for _ in range(120):
        offsets = torch.randint(0, len(data) - window, (batch,))
        samples = torch.stack([torch.cat([torch.tensor([tokenizer.bos_id]), data[o:o + window]]) for o in offsets])
        loss = F.cross_entropy(model(samples[:, :-1]).flatten(0, 1), samples[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def _prompt(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text, bos=True, eos=False)])


def test_greedy_generation_reproduces_the_training_corpus(trained):
    model, tokenizer = trained
    result = generate(model, _prompt(tokenizer, "the quick"), max_new_tokens=60)
    assert tokenizer.decode(result.tokens[0].tolist()) == (CORPUS * 3)[len("the quick"):][:60]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, seed=7),
                                      dict(temperature=0.8, top_k=5, top_p=0.9, seed=3)])
def test_kv_cache_matches_full_recompute(trained, sampling):
    model, tokenizer = trained
    prompt = _prompt(tokenizer, "over the")
    cached = generate(model, prompt, max_new_tokens=40, use_kv_cache=True, **sampling)
    full = generate(model, prompt, max_new_tokens=40, use_kv_cache=False, **sampling)
    assert torch.equal(cached.tokens, full.tokens)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-4, atol=1e-4)


def test_chunked_prefill_after_a_cached_prefix_matches_the_full_forward(trained):
    model, tokenizer = trained
    tokens = _prompt(tokenizer, "jumps over the lazy dog")
    cache = KVCache(model, batch_size=1, max_len=tokens.shape[1])
    first = forward_with_cache(model, tokens[:, :5], cache, start=0)
    rest = forward_with_cache(model, tokens[:, 5:], cache, start=5)
    with torch.no_grad():
        reference = model(tokens)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), reference, rtol=1e-4, atol=1e-4)


def test_same_seed_same_sample_other_seed_other_sample(trained):
    model, tokenizer = trained
    prompt = _prompt(tokenizer, "d")
    runs = [generate(model, prompt, 30, temperature=3.0, seed=seed).tokens for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_top_k_keeps_the_k_largest_logits():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_top_k(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(filter_top_k(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15]])
    logits = probs.log()
    assert torch.isfinite(filter_top_p(logits, 0.7)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.75)).tolist() == [[False, True, True, False]]
    assert torch.isfinite(filter_top_p(logits, 0.76)).tolist() == [[False, True, True, True]]
    assert torch.isfinite(filter_top_p(logits, 0.01)).tolist() == [[False, True, False, False]]
    assert torch.equal(filter_top_p(logits, 1.0), logits)


def test_sampling_only_draws_from_the_filtered_tokens():
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 7] = 2.0, 1.9
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, top_k=2, generator=generator)) for _ in range(200)}
    assert draws == {3, 7}
    assert int(sample_next_token(logits, 0.0)) == 3


@pytest.fixture
def checkpoint_and_config(trained, tmp_path, monkeypatch):
    """The trained model saved as a DCP checkpoint, and a config naming a "tiny" flavor."""
    model, _ = trained
    monkeypatch.setitem(LLAMA3_FLAVORS, "tiny", TINY)
    root = tmp_path / "checkpoint"
    write_dcp_model(model.state_dict(), str(root), step=120)
    config = tmp_path / "tiny.toml"
    config.write_text('[model]\nname = "llama3"\nflavor = "tiny"\ntokenizer = "byte"\n')
    return str(root), str(config)


def test_cli_samples_the_corpus_from_a_checkpoint(checkpoint_and_config, capsys):
    root, config = checkpoint_and_config
    code = generate_cli.main(["--config", config, "--checkpoint", root, "--prompt", "the lazy",
                              "--max-new-tokens", "40", "--device", "cpu"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert out.out.strip() == (CORPUS * 2)[CORPUS.index("the lazy"):][:len("the lazy") + 40].strip()
    assert "step-120" in out.err


def test_cli_rejects_a_checkpoint_of_another_flavor(checkpoint_and_config, capsys):
    root, config = checkpoint_and_config
    code = generate_cli.main(["--config", config, "--checkpoint", root, "--prompt", "x",
                              "--model.flavor", "debugmodel"])
    assert code == 2 and "does not fit" in capsys.readouterr().err


@pytest.mark.parametrize("option,value", [("--top-p", "0"), ("--temperature", "nan"), ("--temperature", "-1"),
                                          ("--top-k", "-1"), ("--seed", str(2**64))])
def test_cli_rejects_bad_sampling_options(checkpoint_and_config, capsys, option, value):
    root, config = checkpoint_and_config
    code = generate_cli.main(["--config", config, "--checkpoint", root, "--prompt", "x", option, value])
    err = capsys.readouterr().err
    assert code == 2 and f"error: {option} " in err and ": must be" in err, err


def test_padded_vocabulary_ids_are_never_drawn_and_finished_rows_stay_at_eos():
    torch.manual_seed(0)
    model = Transformer(Llama3Args(**{**TINY.__dict__, "vocab_size": 64}))
    model.init_weights(seed=3)
    model.eval()
    prompt = torch.randint(0, 40, (4, 5), generator=torch.Generator().manual_seed(1))
    # temperature 2 spreads the draws over the whole vocabulary; ids 40..63 are padding
    result = generate(model, prompt, 60, temperature=2.0, seed=0, vocab_limit=40)
    assert int(result.tokens.max()) < 40
    unrestricted = generate(model, prompt, 60, temperature=2.0, seed=0)
    assert int(unrestricted.tokens.max()) >= 40  # the limit, not the model, kept them out
    eos = int(result.tokens[0, 0])  # the first row stops at once; the others go on
    stopped = generate(model, prompt, 30, temperature=2.0, seed=0, eos_id=eos, vocab_limit=40)
    first_eos = (stopped.tokens == eos).int().argmax(dim=1)
    for row, start in enumerate(first_eos.tolist()):
        if bool((stopped.tokens[row] == eos).any()):
            assert bool((stopped.tokens[row, start:] == eos).all()), (row, stopped.tokens[row])


def test_bfloat16_sampling_keeps_the_float32_rope_table_of_training(checkpoint_and_config):
    """Mixed-precision training casts parameters, not the RoPE buffer: a bfloat16 table would rotate
    every query and key by slightly other angles than the model was trained with."""
    from types import SimpleNamespace

    from torchtitan_like.models.llama3.model import rope_cos_sin

    root, _ = checkpoint_and_config
    config = SimpleNamespace(model=SimpleNamespace(name="llama3", flavor="tiny"))
    model, _ = generate_cli.load_model(config, root, torch.device("cpu"), torch.bfloat16, ByteTokenizer())
    assert model.output.weight.dtype == torch.bfloat16
    assert torch.equal(model.rope_cache, rope_cos_sin(model.args, model.args.max_seq_len))


def test_cli_refuses_a_hugging_face_import_whose_rope_differs_from_the_flavor(tmp_path, monkeypatch, capsys):
    """Same shapes, other RoPE base: the weights would load and sample nonsense."""
    import json

    from safetensors.torch import save_file

    from torchtitan_like.checkpoint.hf_convert import import_hf
    from torchtitan_like.models.llama3.state_dict_adapter import Llama3StateDictAdapter, hf_config

    monkeypatch.setitem(LLAMA3_FLAVORS, "tiny", TINY)
    args = Llama3Args(**{**TINY.__dict__, "vocab_size": ByteTokenizer().vocab_size, "rope_theta": 10000.0})
    model = Transformer(args)
    model.init_weights(seed=0)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_config(args)))
    hf_state = Llama3StateDictAdapter(args).to_hf(model.state_dict())
    save_file({name: value.contiguous() for name, value in hf_state.items()},
              str(tmp_path / "hf" / "model.safetensors"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "imported"))
    config = tmp_path / "tiny.toml"
    config.write_text('[model]\nname = "llama3"\nflavor = "tiny"\ntokenizer = "byte"\n')
    code = generate_cli.main(["--config", str(config), "--checkpoint", str(tmp_path / "imported"), "--prompt", "x"])
    assert code == 2 and "rope_theta: imported 10000.0, model.flavor gives 500000.0" in capsys.readouterr().err


def test_cli_refuses_an_untied_checkpoint_for_a_tied_flavor(checkpoint_and_config, monkeypatch, capsys):
    """The shapes fit, and loading both matrices into the one tied Parameter would keep only one."""
    root, config = checkpoint_and_config
    monkeypatch.setitem(LLAMA3_FLAVORS, "tiny_tied", Llama3Args(**{**TINY.__dict__, "tie_word_embeddings": True}))
    code = generate_cli.main(["--config", config, "--checkpoint", root, "--prompt", "x", "--model.flavor", "tiny_tied"])
    assert code == 2 and "trained with an untied LM head" in capsys.readouterr().err


def test_generate_asks_for_at_least_one_new_token():
    model = Transformer(Llama3Args(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, multiple_of=16,
                                   max_seq_len=8))
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate(model, torch.zeros(1, 2, dtype=torch.long), max_new_tokens=0)
