"""Sample text from a trained checkpoint, with a KV cache, on CPU or GPU.

    python -m torchtitan_like.generate --config TRAIN.toml --checkpoint CKPT_FOLDER --prompt "..." \
        [--max-new-tokens 64] [--temperature 0] [--top-k 0] [--top-p 1.0] [--seed 0] [--device cpu|cuda] \
        [--dtype float32|bfloat16] [--section.key value ...]

The architecture and tokenizer come from the training config (plus overrides); the weights from a
checkpoint folder (a `step-N` folder, or a checkpoint root whose newest complete step is used), read
on this one process with `torch.distributed.checkpoint` (no pickles). The vocabulary size is the
checkpoint's. The prompt is encoded with BOS, as documents are framed in training; generation stops
at EOS or after `--max-new-tokens`. Temperature 0 is greedy decoding; otherwise logits are divided
by the temperature, filtered by top-k and then top-p (nucleus, Holtzman et al. 2019), and sampled
from a generator seeded with `--seed`. Prints the prompt and its continuation on stdout.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch

from torchtitan_like.errors import ConfigError, UserError, run_command

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ------------------------------------------------------------------------------------- sampling
def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Logits with everything below the k-th largest of each row set to -inf; k <= 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Logits outside the nucleus set to -inf: the smallest set of most likely tokens whose
    probability reaches `top_p` (the most likely token is always kept); top_p >= 1 keeps all."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    remove_sorted = mass_before >= top_p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token of each row of `logits` (batch, vocab): argmax when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    filtered = filter_top_p(filter_top_k(logits.float() / temperature, top_k), top_p)
    probs = torch.softmax(filtered, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------- generation
@dataclass
class Generation:
    tokens: torch.Tensor  # (batch, new tokens)
    logits: torch.Tensor  # (batch, new tokens, vocab): the logits each new token was drawn from


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, use_kv_cache: bool = True, eos_id: int | None = None,
             vocab_limit: int | None = None) -> Generation:
    """Continue `prompt` (batch, prompt_len); stops early once every row has produced `eos_id`, and a
    row that has produced it continues with `eos_id` only. `vocab_limit`: ids from there on (a
    vocabulary padded beyond the tokenizer's) are never drawn.

    With `use_kv_cache` the prompt is prefilled in one forward and each new token costs one
    single-token forward; without it every step reruns the full sequence (the reference).
    """
    from torchtitan_like.models.llama3.generation import KVCache, forward_with_cache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    batch, prompt_len = prompt.shape
    generator = torch.Generator(device=prompt.device)
    generator.manual_seed(seed)
    tokens, new_tokens, new_logits = prompt, [], []
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    cache = KVCache(model, batch, prompt_len + max_new_tokens) if use_kv_cache else None
    step_input, start = prompt, 0
    for _ in range(max_new_tokens):
        if cache is not None:
            logits = forward_with_cache(model, step_input, cache, start)[:, -1]
            start += step_input.shape[1]
        else:
            logits = model(tokens)[:, -1]
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits = logits.clone()
            logits[:, vocab_limit:] = float("-inf")  # padding rows of the embedding: no token to decode
        next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None:
            next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
        new_tokens.append(next_token)
        new_logits.append(logits.float())
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        step_input = next_token[:, None]
        if eos_id is not None:
            finished |= next_token == eos_id
            if bool(finished.all()):
                break
    return Generation(tokens=torch.stack(new_tokens, dim=1), logits=torch.stack(new_logits, dim=1))


# -------------------------------------------------------------------------------------- loading
def load_model(config, checkpoint_path: str, device: torch.device, dtype: torch.dtype, tokenizer):
    """The configured model with the checkpoint's weights, in eval mode on `device`."""
    from torchtitan_like.checkpoint.hf_convert import (check_imported_architecture, check_tied_embeddings,
                                                         read_dcp_model)
    from torchtitan_like.models import get_model_spec
    from torchtitan_like.models.llama3.model import rope_cos_sin

    folder, state = read_dcp_model(checkpoint_path)
    spec = get_model_spec(config.model.name)
    args = spec.args_for(config.model.flavor)
    # As the trainer does: a Hugging Face import loads into any flavor of its shapes, and one with
    # another RoPE base or scaling would sample from other logits without a word.
    check_imported_architecture(checkpoint_path, config.model.name, args)
    args.norm_type = "rmsnorm"  # the PyTorch norm: the same `weight`, and it runs on any device
    if "tok_embeddings.weight" not in state:
        raise UserError(f"checkpoint {folder.path} has no tok_embeddings.weight; is it a {config.model.name} model?")
    args.vocab_size = state["tok_embeddings.weight"].shape[0]
    if args.vocab_size < tokenizer.vocab_size:
        raise UserError(f"checkpoint {folder.path} has a vocabulary of {args.vocab_size}, smaller than the "
                        f"tokenizer's {tokenizer.vocab_size}: another tokenizer was used in training")
    with torch.device("meta"):
        model = spec.model_cls(args)
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    found = {name: tuple(value.shape) for name, value in state.items()}
    if expected != found:
        problems = [f"{name}: checkpoint {found.get(name, 'missing')} vs model {shape}"
                    for name, shape in expected.items() if found.get(name) != shape]
        problems += [f"{name}: not in the model" for name in found if name not in expected]
        raise UserError(f"checkpoint {folder.path} does not fit {config.model.name} {config.model.flavor} "
                        f"(another flavor?):\n  " + "\n  ".join(problems[:20]))
    check_tied_embeddings(state, args, folder.path)
    model.to_empty(device=device)
    model.load_state_dict({name: value.to(dtype) for name, value in state.items()})
    model.to(dtype)
    # After the cast: the RoPE table stays float32, as in training (mixed precision casts only the
    # parameters); a bfloat16 table perturbs every rotation by up to 2e-3.
    model.rope_cache = rope_cos_sin(args, args.max_seq_len, device=device)
    return model.eval(), folder


# ------------------------------------------------------------------------------ command line
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m torchtitan_like.generate", description=__doc__.split("\n\n")[0],
                                     epilog="Any other --section.key value pair overrides the config.")
    parser.add_argument("--config", required=True, help="the training TOML (architecture and tokenizer)")
    parser.add_argument("--checkpoint", required=True, help="a step-N folder, or a checkpoint root (newest step)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = all")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus probability mass; 1 = all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    options, overrides = parser.parse_known_args(argv)
    if options.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {options.max_new_tokens}: must be >= 1")
    if not (math.isfinite(options.temperature) and options.temperature >= 0):  # nan fails every comparison
        raise ConfigError(f"--temperature {options.temperature}: must be a finite number >= 0 (0 = greedy)")
    if options.top_k < 0:
        raise ConfigError(f"--top-k {options.top_k}: must be >= 0 (0 = no top-k filtering)")
    if not 0 < options.top_p <= 1:
        raise ConfigError(f"--top-p {options.top_p}: must be in (0, 1]")
    if not 0 <= options.seed < 2**64:  # torch.Generator.manual_seed's range
        raise ConfigError(f"--seed {options.seed}: must be in [0, 2**64 - 1]")
    if options.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine; use --device cpu")
    return options, overrides


def run(argv: list[str]) -> int:
    from torchtitan_like.config import load_config
    from torchtitan_like.data import build_tokenizer

    options, overrides = parse_args(argv)
    config, _ = load_config(["--config", options.config, *overrides])
    tokenizer = build_tokenizer(config.model)
    device = torch.device(options.device)
    model, folder = load_model(config, options.checkpoint, device, DTYPES[options.dtype], tokenizer)
    prompt_ids = tokenizer.encode(options.prompt, bos=True, eos=False)
    if len(prompt_ids) + options.max_new_tokens > model.args.max_seq_len:
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + --max-new-tokens {options.max_new_tokens} exceeds "
                          f"the model's max_seq_len {model.args.max_seq_len}")
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    started = time.perf_counter()
    result = generate(model, prompt, options.max_new_tokens, options.temperature, options.top_k, options.top_p,
                      options.seed, use_kv_cache=True, eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size)
    elapsed = time.perf_counter() - started
    new_ids = result.tokens[0].tolist()
    print(options.prompt + tokenizer.decode(new_ids), flush=True)
    print(f"[{len(new_ids)} tokens in {elapsed:.2f} s ({len(new_ids) / elapsed:.1f} tokens/s) from {folder.path}, "
          f"{options.device} {options.dtype}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
