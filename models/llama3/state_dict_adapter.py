"""Hugging Face `LlamaForCausalLM` <-> our (Meta/TorchTitan) parameter names and layouts.

Two differences besides names:
- RoPE layout. We rotate consecutive pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i + d/2]).
  The rows of wq and wk are therefore permuted so that each head's output puts the even-index
  entries in its first half and the odd ones in its second: the `permute` of HF's
  convert_llama_weights_to_hf.py, applied per head (query heads for wq, key/value heads for wk).
- Tied embeddings. HF stores only `model.embed_tokens.weight` when `tie_word_embeddings` is set; we
  keep both names (`output.weight` is the same tensor as `tok_embeddings.weight`).
"""

from __future__ import annotations

import re

import torch

from torchtitan_like.errors import ConfigError
from torchtitan_like.models.llama3.args import Llama3Args, RopeScaling

_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def _pairs_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta (interleaved pairs) rows -> HF (rotate_half) rows, per head."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, out_dim // n_heads // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def _halves_to_pairs(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of `_pairs_to_halves`."""
    out_dim, in_dim = weight.shape
    return weight.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


class Llama3StateDictAdapter:
    def __init__(self, args: Llama3Args):
        self.args = args

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hf = {}
        for name, value in state_dict.items():
            if name in _GLOBAL_NAMES:
                if name == "output.weight" and self.args.tie_word_embeddings:
                    continue  # HF re-ties lm_head to embed_tokens on load
                hf[_GLOBAL_NAMES[name]] = value
                continue
            match = _OUR_LAYER.match(name)
            if not match or match.group(2) not in _LAYER_NAMES:
                raise ConfigError(f"cannot export parameter {name!r}: no Hugging Face Llama equivalent")
            layer, local = match.groups()
            if local == "attention.wq.weight":
                value = _pairs_to_halves(value, self.args.n_heads)
            elif local == "attention.wk.weight":
                value = _pairs_to_halves(value, self.args.kv_heads)
            hf[f"model.layers.{layer}.{_LAYER_NAMES[local]}"] = value
        return hf

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ours_of_global = {hf_name: ours for ours, hf_name in _GLOBAL_NAMES.items()}
        ours_of_layer = {hf_name: ours for ours, hf_name in _LAYER_NAMES.items()}
        state = {}
        for name, value in hf_state_dict.items():
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a recomputed buffer some older exports carry
            if name in ours_of_global:
                state[ours_of_global[name]] = value
                continue
            match = _HF_LAYER.match(name)
            if not match or match.group(2) not in ours_of_layer:
                raise ConfigError(f"cannot import Hugging Face parameter {name!r}: not part of a Llama model "
                                  f"(biases, attention_bias and mlp_bias are not supported)")
            layer, local = match.group(1), ours_of_layer[match.group(2)]
            if local == "attention.wq.weight":
                value = _halves_to_pairs(value, self.args.n_heads)
            elif local == "attention.wk.weight":
                value = _halves_to_pairs(value, self.args.kv_heads)
            state[f"layers.{layer}.{local}"] = value
        if self.args.tie_word_embeddings:
            state["output.weight"] = state["tok_embeddings.weight"]
        return state


def hf_config(args: Llama3Args, dtype: str = "float32") -> dict:
    """The `config.json` of a LlamaForCausalLM with these args.

    Writes RoPE settings both the transformers 4 way (`rope_theta`, `rope_scaling`) and the 5 way
    (`rope_parameters`), so either version reads it.
    """
    rope_parameters = {"rope_type": "default", "rope_theta": args.rope_theta}
    rope_scaling = None
    if args.rope_scaling is not None:
        scaling = args.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": scaling.factor, "low_freq_factor": scaling.low_freq_factor,
                        "high_freq_factor": scaling.high_freq_factor,
                        "original_max_position_embeddings": scaling.original_max_position_embeddings}
        rope_parameters = {**rope_scaling, "rope_theta": args.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.ffn_hidden_dim,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.kv_heads,
        "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters, "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tie_word_embeddings,
        "torch_dtype": dtype, "dtype": dtype, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
    }


def args_from_hf_config(config: dict) -> Llama3Args:
    """Llama3Args reproducing a LlamaForCausalLM `config.json` (ConfigError for what we cannot build)."""
    if config.get("hidden_act", "silu") != "silu" or config.get("attention_bias") or config.get("mlp_bias"):
        raise ConfigError("Hugging Face config: only hidden_act 'silu' without attention/mlp biases is supported")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads):
        raise ConfigError(f"Hugging Face config: head_dim {config['head_dim']} != hidden_size / num_attention_heads "
                          f"({dim // n_heads}) is not supported")
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or rope
    # transformers 4 names the type "type" in older configs; "default" (written by some versions in
    # rope_scaling too) is plain RoPE.
    scaling_type = scaling.get("rope_type", scaling.get("type"))
    rope_scaling = None
    if scaling_type not in (None, "default"):
        if scaling_type != "llama3":
            raise ConfigError(f"Hugging Face config: rope scaling type {scaling_type!r} is not supported "
                              f"(only 'llama3')")
        rope_scaling = RopeScaling(factor=scaling["factor"], low_freq_factor=scaling["low_freq_factor"],
                                   high_freq_factor=scaling["high_freq_factor"],
                                   original_max_position_embeddings=scaling["original_max_position_embeddings"])
    args = Llama3Args(dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=config.get("num_key_value_heads") or n_heads, vocab_size=config["vocab_size"],
                      norm_eps=config.get("rms_norm_eps", 1e-5),
                      rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                      rope_scaling=rope_scaling, max_seq_len=config.get("max_position_embeddings", 2048),
                      tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))
    # Reproduce any intermediate_size with Llama's rounding rule: a multiplier that lands at or just
    # below the width, rounded up to a multiple of the width itself.
    intermediate = config["intermediate_size"]
    base = int(2 * (4 * dim) / 3)
    args.multiple_of, args.ffn_dim_multiplier = intermediate, intermediate / base
    if args.ffn_hidden_dim != intermediate:
        raise ConfigError(f"Hugging Face config: cannot reproduce intermediate_size {intermediate}")
    return args
