"""Incremental decoding of a Llama 3 `Transformer` with a key/value cache, for sampling.

The training forward recomputes attention over the whole sequence for every new token (O(n^2) work
per token). Here each block's keys and values are written once into a preallocated cache
(batch, max_len, kv_heads, head_dim) per layer, and a forward over new tokens at positions
[start, start + n) attends to the cached prefix plus themselves. The prompt is prefilled in one
forward (n = prompt length), then each decoding step feeds one token (n = 1).

It reuses the model's own modules and weights (`tok_embeddings`, each block's `attention.wq/wk/wv/wo`,
`feed_forward`, the norms, `output`, the `rope_cache` table, `apply_rope` and `repeat_kv`), so it
computes exactly the training forward's function; model.py is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torchtitan_like.models.llama3.model import Transformer, apply_rope, repeat_kv


class KVCache:
    """Keys and values of every layer for positions [0, max_len), filled as decoding proceeds."""

    def __init__(self, model: Transformer, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None):
        args = model.args
        if max_len > args.max_seq_len:
            raise ValueError(f"KV cache of {max_len} positions exceeds the model's max_seq_len {args.max_seq_len}")
        reference = model.output.weight
        dtype, device = dtype or reference.dtype, device or reference.device
        shape = (batch_size, max_len, args.kv_heads, args.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in model.layers]
        self.max_len = max_len


def _attention_mask(start: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Causal mask of `length` queries at positions start.. over keys 0..start+length-1 (True =
    attend); None when the queries may see every key (a single new token)."""
    if length == 1:
        return None
    query_positions = torch.arange(start, start + length, device=device)[:, None]
    key_positions = torch.arange(start + length, device=device)[None, :]
    return key_positions <= query_positions


def _cached_attention(attention: nn.Module, x: torch.Tensor, rope: torch.Tensor, keys_cache: torch.Tensor,
                      values_cache: torch.Tensor, start: int) -> torch.Tensor:
    """`Attention.forward` for tokens at positions [start, start + seq), reading and extending the cache."""
    batch, seq, _ = x.shape
    q = attention.wq(x).view(batch, seq, -1, attention.head_dim)
    k = attention.wk(x).view(batch, seq, -1, attention.head_dim)
    v = attention.wv(x).view(batch, seq, -1, attention.head_dim)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    end = start + seq
    keys_cache[:, start:end] = k
    values_cache[:, start:end] = v
    n_rep = attention.n_heads // attention.n_kv_heads
    keys, values = repeat_kv(keys_cache[:, :end], n_rep), repeat_kv(values_cache[:, :end], n_rep)
    if start == 0:  # prefill: the same causal attention as training
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             is_causal=True)
    else:
        # is_causal aligns the mask to the top-left corner, wrong when queries start after the
        # cached prefix; an explicit mask aligns them to their positions.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                             attn_mask=_attention_mask(start, seq, x.device))
    return attention.wo(out.transpose(1, 2).reshape(batch, seq, -1))


@torch.no_grad()
def forward_with_cache(model: Transformer, tokens: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
    """Logits (batch, seq, vocab) of `tokens` (batch, seq) at positions [start, start + seq); their
    keys and values are added to `cache`, which must already hold positions [0, start)."""
    seq = tokens.shape[1]
    if start + seq > cache.max_len:
        raise ValueError(f"positions up to {start + seq} exceed the KV cache length {cache.max_len}")
    rope = model.rope_cache[start:start + seq]
    h = model.tok_embeddings(tokens)
    for index, block in enumerate(model.layers.values()):
        h = h + _cached_attention(block.attention, block.attention_norm(h), rope, cache.keys[index],
                                  cache.values[index], start)
        h = h + block.feed_forward(block.ffn_norm(h))
    return model.output(model.norm(h))
