"""Per-rank GPU memory estimate of a training step: the arithmetic behind `python -m torchtitan_like.plan`.

Everything is in bytes; "per token" means per token of one microbatch on this rank. The estimate is
the peak of one training step and is the sum of:

1. **Model states** (sharded by FSDP x TP x PP; the caller counts this rank's local parameter
   elements from the DTensor shards): fp32 master parameters (4 B), fp32 gradients (4 B) and AdamW's
   two fp32 moments (8 B): 16 B per local parameter. `training.enable_cpu_offload` moves all three to
   host memory. Split master weights (one process) hold the master in the same 4 B and bf16
   gradients (2 B), plus an fp32 `main_grad` (4 B) with gradient accumulation.
2. **FSDP compute copies**: under mixed precision FSDP all-gathers each unit (a block; the embedding;
   norm + output) in `mixed_precision_param` (bf16, 2 B). Resharding after forward, the peak holds
   two units (the one computing and the one prefetched) plus the norm + output unit, which is never
   resharded; with pipeline parallel (reshard "never") every unit of the stage stays gathered. The
   unsharded gradient of one unit exists in `mixed_precision_reduce` before its reduce-scatter; with
   pipeline parallel and more than one microbatch, torch's pipeline stage turns FSDP's gradient sync
   off until the last microbatch's backward, so the unsharded gradients of every unit of the stage
   are held at once. Units are TP-sharded, so their sizes are divided by the TP degree. Without FSDP
   there is no extra copy.
3. **Activations** saved for backward, counted per transformer block and token, following the method
   of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), whose
   GPT result is s*b*h*(34 + 5*a*s/h) bytes per layer. That formula assumes a 4h GELU MLP, dropout and
   materialized attention scores; for this Llama block (SwiGLU of width F, GQA with kv width
   `kv`, RoPE computed in fp32, fused SDPA so no s^2 term, no dropout) the saved tensors are, in
   elements of 2 B unless noted:
     - attention_norm input h, its output h (input of wq/wk/wv), RoPE's fp32 copies of q and k
       (2h + 2kv in 2-byte units), SDPA's q, repeated k, repeated v and output (4h), wo's input h;
     - ffn_norm input h, its output h (input of w1/w3), w1 out F, silu out F, w3 out F, w2 input F;
     giving 22h + 4kv + 8F bytes per token per block (about 51h for Llama 3 8B, vs 34h for GPT) in
   bf16; in fp32 (`mixed_precision_param = "float32"`) every activation term doubles (an
   overestimate of the fp32 copies RoPE and the loss make anyway; measured 22.6k against 13.4k bytes
   per token per block of the debug model).
   With TP + sequence parallel every tensor is split by the TP degree except the two norm outputs,
   which DTensor saves after the sequence all-gather (4h bytes stay whole).
   - `full` AC keeps only each block's input (2h / tp), plus one block's no-AC activations while it
     is recomputed in backward.
   - `selective` with `op` keeps matmul and attention outputs and recomputes norms, RoPE and the
     SwiGLU pointwise ops: block input h, wq h, wk kv, wv kv, SDPA output h, w1 F, w3 F (split by
     tp), and the partial sums of wo and w2 before their reduce-scatter (2h, whole):
     (8h + 4kv + 4F) / tp + 4h bytes per token per block.
   - `selective` with an integer k checkpoints every k-th block by global layer id (layers k-1,
     2k-1, ...) fully and keeps the rest whole; the caller counts those of this rank's stages, which
     can be more than blocks_on_rank // k (layers 8-15 hold three of every 3rd layer, not two).
   The final norm and output projection add 4h bytes per token, and the loss's forward holds the
   logits (2V in bf16), their fp32 upcast (4V) and the fp32 log-softmax (4V) at once: 10V (8V in
   fp32, which needs no upcast; about 11V measured on CPU, the rest allocator transients). Split by
   tp under loss parallel; whole on every TP rank with `disable_loss_parallel`.
   With `model.attn_mask_type = "block_causal"` each microbatch also holds one additive
   (batch, 1, seq, seq) mask in the compute dtype, shared by its layers (models/llama3/model.py).
4. **Pipeline in-flight microbatches**: a rank holds the activations of several microbatches, in
   units of all of its v stages' blocks. 1F1B holds up to pp, and so do both zero-bubble schedules
   (InterleavedZeroBubble, ZBVZeroBubble: warm-up of v * pp - 1 stage-microbatches, then one
   forward per weight-gradient step; Qi et al. 2023); Interleaved1F1B up to pp * (1 + (pp - 1) /
   (pp * v)) (Narayanan et al. 2021, sec. 2.2.2; its warm-up runs 2 (pp - 1) stage-microbatches
   beyond the v - 1 full rounds); GPipe all of them, and so does LoopedBFS (Lamy-Poirier 2023), which
   runs every forward of all its stages before the first backward. These are the peaks of the
   action orders torch's schedules compute (`_calculate_single_rank_operations`), rank 0 the highest.
5. **Runtime overhead**: CUDA context, NCCL buffers, cuBLAS workspaces and allocator fragmentation,
   a fixed `RUNTIME_OVERHEAD_GIB`.

It is an estimate: compile fusions save some activations, fragmentation can cost more. Leave headroom.
"""

from __future__ import annotations

from dataclasses import dataclass, field

GIB = 1024 ** 3
RUNTIME_OVERHEAD_GIB = 3.0
FP32_BYTES, ADAMW_STATE_BYTES = 4, 8
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Every forward of a step before its first backward: all microbatches' activations at once.
ALL_FORWARDS_FIRST_SCHEDULES = ("GPipe", "LoopedBFS")


@dataclass
class BlockShape:
    """What the activation formulas need from the model."""

    dim: int
    kv_dim: int
    ffn_hidden_dim: int
    vocab_size: int


@dataclass
class RankLayout:
    """What this rank holds and runs, from the applied plan."""

    local_params: int               # parameter elements on this rank after FSDP/TP/PP sharding
    unit_params: list[int]          # per FSDP unit of this rank's stages: elements after TP, before FSDP
    head_unit_params: int           # the norm + output unit's elements after TP (0 if not on this rank)
    blocks_on_rank: int             # transformer blocks in this rank's stages
    checkpointed_blocks: int        # of those, the blocks activation checkpointing wraps
    has_output: bool                # this rank computes the logits (last pipeline stage)
    stages_on_rank: int
    tp: int
    pp: int
    fsdp: bool
    reshard_after_forward: bool


@dataclass
class MemoryEstimate:
    components: dict[str, float] = field(default_factory=dict)  # name -> bytes
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.components.values())


def block_activation_bytes_per_token(shape: BlockShape, tp: int, mode: str) -> float:
    """Bytes saved for backward by one block per token (see the module docstring, item 3)."""
    h, kv, ffn = shape.dim, shape.kv_dim, shape.ffn_hidden_dim
    if mode == "none":
        return (18 * h + 4 * kv + 8 * ffn) / tp + 4 * h
    if mode == "full":
        return 2 * h / tp
    if mode == "op":
        return (8 * h + 4 * kv + 4 * ffn) / tp + 4 * h
    raise ValueError(f"unknown activation mode {mode!r}")


def in_flight_microbatches(schedule: str, pp: int, n_microbatches: int, stages_per_rank: int) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak (item 4)."""
    if pp == 1:
        return 1.0
    if schedule in ALL_FORWARDS_FIRST_SCHEDULES:
        return float(n_microbatches)
    if schedule == "Interleaved1F1B" and stages_per_rank > 1:
        return min(float(n_microbatches), pp * (1 + (pp - 1) / (pp * stages_per_rank)))
    return float(min(n_microbatches, pp))


def logits_bytes_per_token(vocab_size: int, compute_bytes: int, logits_tp: int) -> float:
    """The loss's peak per token (item 3): logits, their fp32 upcast (none in fp32), fp32 log-softmax."""
    upcast = FP32_BYTES if compute_bytes < FP32_BYTES else 0
    return (compute_bytes + upcast + FP32_BYTES) * vocab_size / logits_tp


def activation_bytes(shape: BlockShape, layout: RankLayout, ac_mode: str, selective_option: str,
                     microbatch_tokens: int, in_flight: float, compute_bytes: int = 2,
                     loss_parallel: bool = True) -> tuple[float, float]:
    """(block activations, output-head activations) in bytes for this rank's peak; the block
    formulas count 2-byte (bf16) elements and scale with `compute_bytes`."""
    tp = layout.tp
    if ac_mode == "selective" and selective_option == "op":
        per_block = block_activation_bytes_per_token(shape, tp, "op") * layout.blocks_on_rank
        recompute = 0.0
    elif ac_mode == "full" or (ac_mode == "selective" and selective_option == "1"):
        per_block = block_activation_bytes_per_token(shape, tp, "full") * layout.blocks_on_rank
        recompute = block_activation_bytes_per_token(shape, tp, "none")
    elif ac_mode == "selective":
        checkpointed = layout.checkpointed_blocks
        kept = layout.blocks_on_rank - checkpointed
        per_block = (block_activation_bytes_per_token(shape, tp, "full") * checkpointed
                     + block_activation_bytes_per_token(shape, tp, "none") * kept)
        recompute = block_activation_bytes_per_token(shape, tp, "none") if checkpointed else 0.0
    else:
        per_block = block_activation_bytes_per_token(shape, tp, "none") * layout.blocks_on_rank
        recompute = 0.0
    scale = compute_bytes / 2
    blocks = (per_block * in_flight + recompute) * microbatch_tokens * scale
    head = 0.0
    if layout.has_output:
        # Only the microbatch at the loss holds logits; the others hold the final norm's input.
        logits = logits_bytes_per_token(shape.vocab_size, compute_bytes, tp if loss_parallel else 1)
        head = (4 * shape.dim / tp * scale + logits) * microbatch_tokens
    return blocks, head


def estimate_memory(shape: BlockShape, layout: RankLayout, training, parallelism, ac_config,
                    attn_mask_type: str = "causal") -> MemoryEstimate:
    """The per-rank peak estimate (module docstring) for one training step."""
    estimate = MemoryEstimate()
    states = {"parameters (fp32 master)": FP32_BYTES, "gradients (fp32)": FP32_BYTES,
              "optimizer states (AdamW, 2 x fp32)": ADAMW_STATE_BYTES}
    if training.master_weights == "split":  # one process: bf16 halves + int16 remainders, bf16 gradients
        states = {"parameters (split master: bf16 + int16 remainder)": FP32_BYTES, "gradients (bf16)": 2,
                  "optimizer states (AdamW, 2 x fp32)": ADAMW_STATE_BYTES}
        if training.global_batch_size not in (-1, training.local_batch_size):
            states["gradient accumulation (fp32 main_grad)"] = FP32_BYTES
    for name, bytes_per_param in states.items():
        estimate.components[name] = 0.0 if training.enable_cpu_offload else layout.local_params * bytes_per_param
    if training.enable_cpu_offload:
        estimate.notes.append("training.enable_cpu_offload: parameters, gradients and optimizer states live "
                              "in host memory")

    microbatch = parallelism.pipeline_parallel_microbatch_size if layout.pp > 1 else training.local_batch_size
    n_microbatches = training.local_batch_size // microbatch
    if layout.fsdp:
        param_bytes = DTYPE_BYTES[training.mixed_precision_param]
        reduce_bytes = DTYPE_BYTES[training.mixed_precision_reduce]
        largest = max(layout.unit_params, default=0)
        if layout.reshard_after_forward:
            gathered = 2 * largest + layout.head_unit_params
        else:
            gathered = sum(layout.unit_params)
        estimate.components[f"FSDP gathered copies ({training.mixed_precision_param})"] = gathered * param_bytes
        if layout.pp > 1 and n_microbatches > 1:  # no reduce-scatter until the last microbatch
            estimate.components["FSDP unsharded gradients (every unit of the stage)"] = (
                sum(layout.unit_params) * reduce_bytes)
        else:
            estimate.components["FSDP unsharded gradient (one unit)"] = largest * reduce_bytes

    in_flight = in_flight_microbatches(parallelism.pipeline_parallel_schedule, layout.pp, n_microbatches,
                                       layout.stages_on_rank)
    blocks, head = activation_bytes(shape, layout, ac_config.mode, ac_config.selective_ac_option,
                                    microbatch * training.seq_len, in_flight,
                                    compute_bytes=DTYPE_BYTES[training.mixed_precision_param],
                                    loss_parallel=not parallelism.disable_loss_parallel)
    mode = ac_config.mode + (f" {ac_config.selective_ac_option}" if ac_config.mode == "selective" else "")
    estimate.components[f"activations (AC {mode}, {in_flight:g} microbatch(es) in flight)"] = blocks
    if attn_mask_type == "block_causal":  # one additive (batch, 1, seq, seq) mask per microbatch, every layer's
        estimate.components["block-causal attention mask (one per microbatch in flight)"] = (
            in_flight * microbatch * training.seq_len**2 * DTYPE_BYTES[training.mixed_precision_param])
    if layout.has_output:
        estimate.components["output logits + loss (fp32 upcast, log-softmax)"] = head
    estimate.components["runtime overhead (CUDA context, NCCL, fragmentation)"] = RUNTIME_OVERHEAD_GIB * GIB
    return estimate


def suggestions(estimate: MemoryEstimate, layout: RankLayout, training, parallelism, ac_config) -> list[str]:
    """Knobs that shrink the largest components, most effective first."""
    states = sum(value for name, value in estimate.components.items()
                 if name.startswith(("parameters", "gradients", "optimizer")))
    activations = sum(value for name, value in estimate.components.items()
                      if name.startswith(("activations", "output logits")))
    hints = []
    activation_hints = []
    if ac_config.mode != "full":
        activation_hints.append("activation_checkpoint.mode = \"full\" (keeps only block inputs)")
    if training.local_batch_size > 1 and layout.pp == 1:
        activation_hints.append("a smaller training.local_batch_size (use global_batch_size for gradient "
                                "accumulation)")
    if layout.pp > 1 and parallelism.pipeline_parallel_microbatch_size > 1:
        activation_hints.append("a smaller parallelism.pipeline_parallel_microbatch_size")
    activation_hints.append("more tensor parallel (parallelism.tensor_parallel_degree: sequence parallel splits "
                            "activations too)")
    state_hints = []
    if parallelism.data_parallel_replicate_degree > 1:
        state_hints.append("FSDP over more ranks (lower data_parallel_replicate_degree, raise "
                           "data_parallel_shard_degree)")
    elif not layout.fsdp:
        state_hints.append("FSDP (data_parallel_shard_degree > 1 shards parameters, gradients and optimizer states)")
    state_hints.append("more tensor or pipeline parallel (tensor_parallel_degree, pipeline_parallel_degree), "
                       "or more GPUs")
    if not training.enable_cpu_offload:
        state_hints.append("training.enable_cpu_offload = true (slow)")
    hints = activation_hints + state_hints if activations >= states else state_hints + activation_hints
    return hints
