"""Llama 3 hyper-parameters and the published flavors (debug to 405B).

Dimensions follow Meta's Llama 3.1 / 3.2 releases. The FFN width follows Llama 3's rule
(`ffn_hidden_dim`), so flavors list `multiple_of` and `ffn_dim_multiplier` rather than the width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass
class RopeScaling:
    """Llama 3.1 frequency scaling of RoPE (context extension), from Meta's reference code."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class Llama3Args:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = -1  # -1: set from the tokenizer when the model is built
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131072
    tie_word_embeddings: bool = False
    depth_init: bool = True  # scale output-projection init by layer depth (TorchTitan's default)
    norm_type: str = "rmsnorm"  # rmsnorm/torch_rmsnorm (PyTorch) or triton_rmsnorm (kernels/)
    # Attention kernels scaled_dot_product_attention may use, in priority order ("cudnn", "flash",
    # "efficient", "math"); empty lets PyTorch choose. Applied inside the forward, so compile sees it.
    sdpa_backends: tuple[str, ...] = ()
    # Grouped-query attention inside the kernel (`enable_gqa`), K/V not repeated to every query head:
    # set where the allowed kernels support it (the trainer decides; see `Attention.forward`).
    sdpa_native_gqa: bool = False
    # "causal", or "block_causal": a token attends only to earlier tokens of its own document, the
    # documents of a packed sample told apart by `document_start_id` (the tokenizer's BOS, which
    # packing puts at the start of every document; set by the trainer).
    attn_mask_type: str = "causal"
    document_start_id: int = -1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Llama's SwiGLU width: 2/3 of 4*dim, times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def num_params(self, include_embedding: bool = True) -> int:
        """Exact parameter count of the model these args build."""
        head_dim, kv_dim = self.head_dim, self.kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attention + ffn + 2 * self.dim
        embedding = self.vocab_size * self.dim
        output = 0 if self.tie_word_embeddings else self.vocab_size * self.dim
        total = self.n_layers * per_layer + self.dim + output + (embedding if include_embedding else 0)
        del head_dim
        return total

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token: 6 * (non-embedding params) + attention scores term.

        6N counts forward (2N) and backward (4N) matmul FLOPs of every weight except the embedding
        lookup (PaLM appendix B); the attention term 12 * L * H * Dh * T covers QK^T and PV for the
        full (non-causal-discounted) sequence, as TorchTitan and PaLM report it.
        """
        non_embedding = self.num_params(include_embedding=False)
        if self.tie_word_embeddings:  # the tied matrix still does the output matmul
            non_embedding += self.vocab_size * self.dim
        attention = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * non_embedding + attention


_LLAMA31_SCALING = RopeScaling(factor=8.0)
_LLAMA32_SCALING = RopeScaling(factor=32.0)

LLAMA3_FLAVORS: dict[str, Llama3Args] = {
    "debugmodel": Llama3Args(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64,
                             rope_theta=500000.0, max_seq_len=2048),
    # the debug model with the LM head tied to the embedding, as in the 1B and 3B flavors (for tests)
    "debugmodel_tied": Llama3Args(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, multiple_of=64,
                                  rope_theta=500000.0, max_seq_len=2048, tie_word_embeddings=True),
    "1B": Llama3Args(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256,
                     rope_scaling=_LLAMA32_SCALING, tie_word_embeddings=True),
    "3B": Llama3Args(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256,
                     rope_scaling=_LLAMA32_SCALING, tie_word_embeddings=True),
    "8B": Llama3Args(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                     rope_scaling=_LLAMA31_SCALING),
    # Llama 3.1 8B cut to 8 layers: the shape of the shared TorchTitan throughput anchor.
    "8B_8L": Llama3Args(dim=4096, n_layers=8, n_heads=32, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024,
                        rope_scaling=_LLAMA31_SCALING),
    "70B": Llama3Args(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096,
                      rope_scaling=_LLAMA31_SCALING),
    "405B": Llama3Args(dim=16384, n_layers=126, n_heads=128, n_kv_heads=8, ffn_dim_multiplier=1.2,
                       multiple_of=4096, rope_scaling=_LLAMA31_SCALING),
}
FLAVOR_ALIASES = {"debug": "debugmodel", "debug_model": "debugmodel"}


def get_flavor(name: str) -> Llama3Args:
    """A fresh copy of a flavor's args (aliases accepted)."""
    return replace(LLAMA3_FLAVORS[FLAVOR_ALIASES.get(name, name)])
