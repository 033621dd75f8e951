"""Llama 3: pre-norm decoder with RMSNorm, RoPE, grouped-query attention and a SwiGLU FFN.

Parameter names are Meta's / TorchTitan's (`tok_embeddings`, `layers.N.attention.wq`, ...), so
checkpoints map one to one. The model knows nothing of parallelism: sharding, pipelining,
checkpointing and compilation are applied from outside (`parallelisms/`). Blocks live in a
`ModuleDict` keyed by layer index, so a pipeline stage can drop layers and keep the same names, and
`tok_embeddings` / `norm` / `output` may be set to None in stages that do not own them.
"""

from __future__ import annotations

import contextlib
import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from torchtitan_like.models.llama3.args import Llama3Args


def rope_frequencies(args: Llama3Args, device: torch.device | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies theta^(-2i/d), with Llama 3.1 scaling when configured."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim))
    scaling = args.rope_scaling
    if scaling is not None:
        # Meta's llama3.1 `apply_scaling`: long wavelengths slowed by `factor`, short ones kept,
        # a smooth interpolation between the low- and high-frequency cut-offs.
        low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
        wavelen = 2 * math.pi / freqs
        smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        scaled = torch.where(wavelen > low_wavelen, freqs / scaling.factor, freqs)
        mid = (1 - smooth) * freqs / scaling.factor + smooth * freqs
        is_mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        freqs = torch.where(is_mid, mid, scaled)
    return freqs


def rope_cos_sin(args: Llama3Args, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Table of shape (seq_len, head_dim/2, 2) holding cos and sin of position * frequency."""
    freqs = rope_frequencies(args, device)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float64), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of each head by the position's angle.

    x: (batch, seq, heads, head_dim); rope: (seq, head_dim/2, 2). Equivalent to multiplying the
    complex numbers x[2i] + j x[2i+1] by exp(j * pos * freq_i) (RoFormer eq. 34, Meta's layout).
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    cos = rope[: x.shape[1], :, 0].view(1, x.shape[1], 1, -1)
    sin = rope[: x.shape[1], :, 1].view(1, x.shape[1], 1, -1)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([real * cos - imag * sin, real * sin + imag * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, seq, kv_heads, head_dim) -> (batch, seq, kv_heads * n_rep, head_dim) for GQA."""
    if n_rep == 1:
        return x
    batch, seq, kv_heads, head_dim = x.shape
    return x[:, :, :, None, :].expand(batch, seq, kv_heads, n_rep, head_dim).reshape(batch, seq, kv_heads * n_rep, head_dim)


def build_norm(args: Llama3Args) -> nn.Module:
    """RMSNorm in PyTorch, or the fused Triton kernel (same `weight` parameter either way)."""
    if args.norm_type == "triton_rmsnorm":
        from torchtitan_like.kernels.rmsnorm import TritonRMSNorm

        return TritonRMSNorm(args.dim, eps=args.norm_eps)
    return nn.RMSNorm(args.dim, eps=args.norm_eps)


def add_and_norm(norm: nn.Module, x: torch.Tensor, update: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + update and norm(h); a norm with its own `add_and_norm` (the Triton one) fuses both."""
    if hasattr(norm, "add_and_norm"):
        return norm.add_and_norm(x, update)
    h = x + update
    return h, norm(h)


def document_mask(tokens: torch.Tensor, document_start_id: int) -> torch.Tensor:
    """Block-causal mask of packed samples, (batch, 1, seq, seq) boolean: query i may attend to key j
    when j <= i and both lie in the same document. A document starts at each `document_start_id`
    token (BOS); tokens before a sample's first BOS are the tail of a document cut by the window
    and form their own. RoPE is relative, so each document is then computed as if it were alone."""
    if document_start_id < 0:
        raise ValueError("block_causal attention needs Llama3Args.document_start_id (the tokenizer's BOS id)")
    documents = torch.cumsum(tokens == document_start_id, dim=1)
    seq = tokens.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril()
    return (causal & (documents[:, :, None] == documents[:, None, :]))[:, None]


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask's additive form (0 where attended, -inf elsewhere) in the attention's dtype.
    SDPA makes this form from a boolean mask at every call: a new (batch, 1, seq, seq) tensor per
    layer, which a kernel that keeps its mask for backward (the memory-efficient one) would hold
    once per layer. Made once here, every layer gets the same tensor."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


SDPA_BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                 "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def sdpa_backend_context(backends: list[SDPBackend]):
    """Only these SDPA kernels, tried in this order; none given: PyTorch's own choice. Entered inside
    the forward, so the choice is part of the compiled graph and of the compile cache's key (around
    a compiled call it is neither, and a graph cached under another choice would be reused)."""
    if not backends:
        return contextlib.nullcontext()
    return sdpa_kernel(backends, set_priority=True)


class Attention(nn.Module):
    def __init__(self, args: Llama3Args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.kv_heads, args.head_dim
        self.sdpa_backends = [SDPA_BACKENDS[name] for name in args.sdpa_backends]
        self.native_gqa = args.sdpa_native_gqa
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: None for causal attention, else the additive (batch, 1, seq, seq) bias of the key
        positions each query may attend to (`document_mask`, `attention_bias`)."""
        batch, seq, _ = x.shape
        # -1 instead of the head count: under tensor parallel each rank holds only its local heads.
        q = self.wq(x).view(batch, seq, -1, self.head_dim)
        k = self.wk(x).view(batch, seq, -1, self.head_dim)
        v = self.wv(x).view(batch, seq, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        n_rep = self.n_heads // self.n_kv_heads
        # The kernel reads each K/V head for its group of query heads (cuDNN and flash on CUDA in half
        # precision, both CPU kernels); otherwise K/V are repeated to every query head first.
        native_gqa = n_rep > 1 and self.native_gqa and (not q.is_cuda or q.dtype in (torch.bfloat16, torch.float16))
        if not native_gqa:
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        with sdpa_backend_context(self.sdpa_backends):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 attn_mask=mask, is_causal=mask is None, enable_gqa=native_gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, layer_id: int, args: Llama3Args):
        super().__init__()
        self.layer_id = layer_id
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = build_norm(args)
        self.ffn_norm = build_norm(args)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h, normed = add_and_norm(self.ffn_norm, x, self.attention(self.attention_norm(x), rope, mask))
        return h + self.feed_forward(normed)


class Transformer(nn.Module):
    def __init__(self, args: Llama3Args):
        super().__init__()
        if args.vocab_size <= 0:
            raise ValueError("Llama3Args.vocab_size must be set (from the tokenizer) before building the model")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, args) for i in range(args.n_layers)})
        self.norm = build_norm(args)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.tie_weights()
        self.register_buffer("rope_cache", rope_cos_sin(args, args.max_seq_len), persistent=False)

    def tie_weights(self) -> None:
        """With `tie_word_embeddings`, make the LM head use the embedding's Parameter. Called again
        wherever a new Parameter replaces one of them: after tensor parallelism shards them, and after
        `to_empty` materializes them (both give each module its own Parameter). Under FSDP2 the two
        share one unit, which keeps them tied (models/llama3/parallelize.py)."""
        if self.args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None:
            if self.output.weight is not self.tok_embeddings.weight:
                self.output.weight = self.tok_embeddings.weight

    def to_empty(self, *, device, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    def forward(self, tokens: torch.Tensor, document_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) int64 -> logits (batch, seq, vocab); a later pipeline stage takes hidden
        states (batch, seq, dim) instead, and for a block-causal mask the microbatch's tokens as
        `document_tokens` (parallelisms/pipeline.py passes them to every stage)."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        mask = None
        if self.args.attn_mask_type == "block_causal":
            if document_tokens is None:
                if self.tok_embeddings is None:
                    raise ValueError("block_causal attention in a later pipeline stage needs document_tokens")
                document_tokens = tokens
            device_type = h.device.type
            dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
            mask = attention_bias(document_mask(document_tokens, self.args.document_start_id), dtype)
        for layer in self.layers.values():
            h = layer(h, self.rope_cache, mask)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    # ------------------------------------------------------------------ initialization
    def init_std(self, fqn: str) -> tuple[str, float]:
        """(distribution, std) of a parameter by name; depth-scaled output projections (GPT-2/OLMo)."""
        args = self.args
        if fqn.endswith("norm.weight"):
            return "ones", 0.0
        # A tied embedding is also the LM head: it takes the head's init (std 1 would make the initial
        # logits' std about sqrt(dim), a loss in the thousands), as TorchTitan's tied models end up with.
        if fqn.startswith("tok_embeddings") and not args.tie_word_embeddings:
            return "normal", 1.0
        if fqn.startswith(("output", "tok_embeddings")):
            return "trunc_normal", args.dim ** -0.5
        if fqn.endswith(("attention.wo.weight", "feed_forward.w2.weight", "feed_forward.w3.weight")):
            layer_id = int(fqn.split(".")[1])
            depth = (layer_id + 1) if args.depth_init else args.n_layers
            return "trunc_normal", 0.02 / math.sqrt(2 * depth)
        return "trunc_normal", 0.02

    def init_weights(self, seed: int = 0, buffer_device: torch.device | None = None) -> None:
        """Deterministic init from `seed`, independent of device placement and sharding.

        Each parameter draws its full value from a generator seeded by (seed, its name), so a model
        materialized from the meta device, a directly built one and every sharded or pipelined
        copy get the same weights. Sharded (DTensor) parameters keep their local slice.
        """
        from torchtitan_like.distributed.tensors import assign_full_value

        with torch.no_grad():
            for wrapped_fqn, param in self.named_parameters():
                # Activation-checkpoint wrappers and torch.compile insert these into the names;
                # seeding by the plain name gives every parallel plan the same weights.
                fqn = wrapped_fqn.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
                kind, std = self.init_std(fqn)
                generator_device = param.device if param.device.type != "meta" else torch.device("cpu")
                generator = torch.Generator(device=generator_device)
                generator.manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
                full = torch.empty(param.shape, dtype=torch.float32, device=generator_device)
                if kind == "ones":
                    full.fill_(1.0)
                elif kind == "normal":
                    nn.init.normal_(full, std=std, generator=generator)
                else:
                    nn.init.trunc_normal_(full, std=std, a=-3 * std, b=3 * std, generator=generator)
                assign_full_value(param, full)
            device = buffer_device or self.rope_cache.device
            self.rope_cache = rope_cos_sin(self.args, self.args.max_seq_len, device=device)

