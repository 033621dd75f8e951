"""The typed configuration: one dataclass per TOML section, one documented field per key.

Section and key names follow TorchTitan's TOML conventions so a TorchTitan llama3 TOML loads with few
or no changes (differences are listed in docs/config.md). Each field carries its documentation and
its constraints in `metadata`: `doc` (one line), optionally `choices`, `ge`/`gt`/`le`/`lt` bounds. The
loader in `manager.py` checks types and these constraints generically (an integer without an `le`
bound must also fit in 64 bits); rules that relate several keys live in `validate.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def option(default: Any, doc: str, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A config field with its one-line documentation and optional constraints."""
    metadata = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Job:
    config_file: str = option("", "Path of the TOML file this config was read from (set by the loader).")
    dump_folder: str = option("./outputs", "Run output folder: resolved config, logs, TensorBoard, checkpoints.")
    description: str = option("", "Free-text description of the run, printed at start-up.")
    print_config: bool = option(False, "Print the resolved config at start-up (also `--print-config`).")


@dataclass
class Model:
    name: str = option("llama3", "Model family, a key of the model registry (`torchtitan_like.models`).")
    flavor: str = option("debugmodel", "Size preset of the model family, e.g. debugmodel, 1B, 3B, 8B, 70B, 405B.")
    tokenizer: str = option("auto", "Tokenizer kind.", choices=("auto", "byte", "hf", "tiktoken"))
    hf_assets_path: str = option("", "Folder or file with tokenizer assets (tokenizer.json or tokenizer.model); "
                                     "empty uses the built-in byte tokenizer.")
    tokenizer_path: str = option("", "Deprecated TorchTitan alias of hf_assets_path.")
    vocab_size: int = option(-1, "Model vocabulary size; -1 follows the tokenizer, a larger value pads "
                                 "(e.g. 128256), a smaller one is an error.", ge=-1,
                             le=2**32)  # token ids are stored as uint32 (data/packing.py)
    norm_type: str = option("rmsnorm", "Normalization layer implementation.",
                            choices=("rmsnorm", "triton_rmsnorm", "torch_rmsnorm"))
    sdpa_backend: str = option("auto", "Attention kernel for scaled_dot_product_attention, the only one allowed; "
                                       "auto: cudnn first on H100/H200 (sm90), else PyTorch's choice.",
                               choices=("auto", "flash", "cudnn", "efficient", "math"))
    attn_mask_type: str = option("causal", "Attention mask: causal over the whole packed sample, or block_causal: "
                                           "each token attends only within its own document (split at BOS), "
                                           "as Llama 3 was trained.", choices=("causal", "block_causal"))
    converters: list = option([], "Model converters applied after construction, e.g. [\"float8\"].")
    print_after_conversion: bool = option(False, "Print the model after converters are applied.")


@dataclass
class Optimizer:
    name: str = option("AdamW", "Optimizer.", choices=("AdamW", "Adam"))
    lr: float = option(8e-4, "Peak learning rate.", gt=0.0)
    # torch's Adam refuses a beta of 1 (and bias correction would divide by 1 - 1**t = 0)
    beta1: float = option(0.9, "Adam beta1.", ge=0.0, lt=1.0)
    beta2: float = option(0.95, "Adam beta2.", ge=0.0, lt=1.0)
    eps: float = option(1e-8, "Adam epsilon.", gt=0.0)
    weight_decay: float = option(0.1, "Weight decay of matrices (not norms, biases): decoupled for AdamW, L2 for Adam.", ge=0.0)
    implementation: str = option("auto", "Kernel implementation; auto picks triton on CUDA (fused without Triton or with CPU offload), "
                                         "foreach elsewhere; triton: one Triton kernel per parameter that moves "
                                         "less memory than fused.",
                                 choices=("auto", "fused", "foreach", "for-loop", "triton"))


@dataclass
class LRScheduler:
    warmup_steps: int = option(200, "Linear warmup steps from near zero to the peak learning rate.", ge=0)
    decay_type: str = option("cosine", "Shape after warmup.", choices=("cosine", "linear", "sqrt", "constant"))
    decay_ratio: float = option(-1.0, "Fraction of steps spent decaying at the end (warmup-stable-decay); "
                                      "-1 decays over all steps after warmup.", le=1.0)
    min_lr_factor: float = option(0.1, "Final learning rate as a fraction of the peak.", ge=0.0, le=1.0)


@dataclass
class Training:
    dataset: str = option("builtin", "Dataset: builtin (shipped corpus), local (text files from dataset_path), "
                                     "tokenized (shards from prepare-data), huggingface (datasets package).",
                          choices=("builtin", "local", "tokenized", "huggingface"))
    dataset_path: str = option("", "File, folder or glob of the corpus (local/tokenized) or dataset name (huggingface).")
    dataset_text_field: str = option("text", "Field holding the text in .jsonl/.json/.parquet/HF records.")
    dataset_verify_checksums: bool = option(False, "tokenized: check every shard against the SHA-256 prepare-data "
                                                   "recorded (reads every byte at start-up; sizes are always checked).")
    local_batch_size: int = option(8, "Samples per data-parallel rank per forward (one microbatch; see global_batch_size).", ge=1)
    global_batch_size: int = option(-1, "Samples per optimizer step across all DP ranks; -1 = local x DP. "
                                        "Larger values use gradient accumulation.", ge=-1)
    seq_len: int = option(2048, "Tokens per sample.", ge=2)
    max_norm: float = option(1.0, "Gradient clipping by global norm; 0 disables clipping.", ge=0.0)
    steps: int = option(10000, "Optimizer steps to train.", ge=1)
    mixed_precision_param: str = option("bfloat16", "Parameter/compute dtype on GPU, and on CPU with master_weights = split (CPU otherwise trains in float32); "
                                        "no float16: it needs loss scaling, which bfloat16 does not.",
                                        choices=("bfloat16", "float32"))
    mixed_precision_reduce: str = option("float32", "Gradient reduction dtype under FSDP.",
                                         choices=("float32", "bfloat16"))
    master_weights: str = option("float32", "Master weights of a run without FSDP, tensor or pipeline parallel: "
                                            "float32 keeps fp32 parameters that autocast casts to bf16 for each op (on "
                                            "GPU); split stores each as its bf16 rounding, which the model computes "
                                            "with (activations in bf16, as under FSDP), plus the 16 low bits of its fp32 "
                                            "value, which the Triton AdamW/Adam step updates exactly: no weight or "
                                            "gradient casts, the same memory (docs/training.md).",
                                 choices=("float32", "split"))
    enable_cpu_offload: bool = option(False, "Offload FSDP parameters, gradients and optimizer state to CPU.")
    seed: int = option(0, "Random seed for weights, data order and dropout-free RNG streams.", ge=0,
                       le=2**64 - 1)  # torch.manual_seed's range
    deterministic: bool = option(False, "Use deterministic algorithms (slower) for bitwise-reproducible runs.")
    gc_freq: int = option(50, "Run Python garbage collection every this many steps.", ge=1)
    device: str = option("auto", "Device type; auto picks cuda when available, else cpu.", choices=("auto", "cuda", "cpu"))


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = option(1, "Replicated data-parallel degree (HSDP outer dim).", ge=1)
    data_parallel_shard_degree: int = option(-1, "Sharded data-parallel (FSDP) degree; -1 infers it from the world size.", ge=-1)
    fsdp_reshard_after_forward: str = option("default", "FSDP reshard policy; default = always without PP, never with PP.",
                                             choices=("default", "always", "never"))
    tensor_parallel_degree: int = option(1, "Tensor (and sequence) parallel degree.", ge=1)
    disable_loss_parallel: bool = option(False, "Gather the vocab-sharded logits before the loss instead of loss parallel.")
    enable_async_tensor_parallel: bool = option(False, "Async TP (CUDA with torch.compile only).")
    pipeline_parallel_degree: int = option(1, "Pipeline parallel degree (number of ranks in a pipeline).", ge=1)
    pipeline_parallel_split_points: list = option([], "Module names starting each stage after the first, e.g. [\"layers.4\"]; "
                                                      "empty = balanced automatic split.")
    pipeline_parallel_layers_per_stage: int = option(-1, "Transformer layers per virtual stage; -1 = one stage per rank "
                                                         "(two per rank for interleaved schedules).", ge=-1)
    pipeline_parallel_schedule: str = option("1F1B", "Pipeline schedule.",
                                             choices=("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS",
                                                      "InterleavedZeroBubble", "ZBVZeroBubble"))
    pipeline_parallel_microbatch_size: int = option(1, "Samples per pipeline microbatch.", ge=1)
    context_parallel_degree: int = option(1, "Context parallel degree (not supported yet: must be 1).", ge=1, le=1)


@dataclass
class Checkpoint:
    enable: bool = option(False, "Save and load distributed checkpoints.")
    folder: str = option("checkpoint", "Checkpoint folder, relative to job.dump_folder.")
    interval: int = option(500, "Save every this many steps.", ge=1)
    keep_latest_k: int = option(0, "Keep only the newest k complete checkpoints; 0 keeps all.", ge=0)
    load_step: int = option(-1, "Step to load; -1 loads the newest complete checkpoint.", ge=-1)
    last_save_model_only: bool = option(True, "The final save also exports the model alone, in export_dtype, to "
                                                      "<folder>/export/step-N (the full checkpoint is kept).")
    export_dtype: str = option("float32", "Dtype of a model-only export.", choices=("float32", "bfloat16", "float16"))
    async_mode: str = option("disabled", "Asynchronous saving.", choices=("disabled", "async", "async_with_pinned_mem"))
    exclude_from_loading: list = option([], "State keys not loaded on resume, e.g. [\"optimizer\", \"dataloader\"].")
    initial_load_path: str = option("", "Checkpoint folder to initialize from when the run has none of its own.")
    initial_load_model_only: bool = option(True, "Load only model weights from initial_load_path.")
    create_seed_checkpoint: bool = option(False, "Initialize on one rank, save step 0 and exit.")


@dataclass
class ActivationCheckpoint:
    mode: str = option("none", "Activation checkpointing.", choices=("none", "full", "selective"))
    selective_ac_option: str = option("2", "Selective AC: a positive integer k checkpoints every k-th layer; "
                                           "'op' saves matmul outputs and recomputes the rest.")


@dataclass
class Compile:
    enable: bool = option(False, "torch.compile each transformer block (and the loss).")
    components: list = option(["model", "loss"], "What to compile: model and/or loss.")
    backend: str = option("inductor", "torch.compile backend.")


@dataclass
class Float8:
    enable: bool = option(False, "Swap eligible nn.Linear layers for Float8Linear (also model.converters = [\"float8\"]).")
    recipe_name: str = option("tensorwise", "Scaling recipe.", choices=("tensorwise", "rowwise"))
    backend: str = option("auto", "FP8 GEMM backend.", choices=("auto", "triton", "torch"))
    filter_fqns: list = option(["output"], "Module names (substring match) kept in high precision.")
    enable_fsdp_float8_all_gather: bool = option(False, "All-gather FSDP weights in float8 (tensorwise only).")
    precompute_float8_dynamic_scale_for_fsdp: bool = option(False, "Compute FSDP float8 weight scales in one pass after the optimizer step.")
    emulate: bool = option(False, "Emulate float8 matmuls in high precision (for devices without FP8, e.g. CPU tests).")
    save_fp8_weight: str = option("auto", "Tensorwise: keep the forward's transposed fp8 weight for backward instead of re-casting the weight (1 B per weight element until backward); auto = when FSDP does not shard the weights.", choices=("auto", "always", "never"))


@dataclass
class Metrics:
    log_freq: int = option(10, "Log metrics every this many steps.", ge=1)
    enable_tensorboard: bool = option(True, "Write TensorBoard event files.")
    save_tb_folder: str = option("tb", "TensorBoard folder, relative to job.dump_folder.")
    save_for_all_ranks: bool = option(False, "Write metrics from every rank (default rank 0 only).")
    disable_color_printing: bool = option(False, "Plain log lines without ANSI colors.")
    peak_flops: float = option(-1.0, "Peak dense bf16 FLOP/s of one device for MFU; -1 looks the device up.", ge=-1)
    enable_wandb: bool = option(False, "Accepted for TorchTitan compatibility; Weights & Biases is not supported.")


@dataclass
class Profiling:
    enable_profiling: bool = option(False, "Collect torch profiler traces.")
    save_traces_folder: str = option("profile_trace", "Trace folder, relative to job.dump_folder.")
    profile_freq: int = option(10, "Profile one step out of every this many.", ge=1)
    enable_memory_snapshot: bool = option(False, "Record CUDA memory snapshots.")
    save_memory_snapshot_folder: str = option("memory_snapshot", "Snapshot folder, relative to job.dump_folder.")


@dataclass
class Comm:
    # Timeouts at most 2**31 - 1 s (68 years): torch turns them into int64 micro- and nanosecond
    # counts, which a larger value overflows (gloo refused 10**13 s as a negative timeout).
    init_timeout_seconds: int = option(300, "Collective timeout of every group from start-up to the end of the first step (checkpoint load, compilation), and during the first validation.",
                                       ge=1, le=2**31 - 1)
    train_timeout_seconds: int = option(100, "Collective timeout of every group (default and mesh dims) after the first step (but the first validation).",
                                        ge=1, le=2**31 - 1)
    trace_buf_size: int = option(20000, "NCCL flight-recorder entries kept for hang dumps (0 disables).", ge=0,
                                 le=2**31 - 1)  # torch reads TORCH_NCCL_TRACE_BUFFER_SIZE as a C int


@dataclass
class Validation:
    enable: bool = option(False, "Run periodic validation (loss and perplexity on held-out data).")
    dataset: str = option("builtin", "Validation dataset, as training.dataset; builtin uses the held-out split.",
                          choices=("builtin", "local", "tokenized", "huggingface"))
    dataset_path: str = option("", "Validation corpus path (as training.dataset_path).")
    local_batch_size: int = option(8, "Samples per rank per validation step.", ge=1)
    seq_len: int = option(-1, "Tokens per validation sample (at least 2); -1 uses training.seq_len.", ge=-1)
    freq: int = option(100, "Validate every this many steps.", ge=1)
    steps: int = option(10, "Validation batches per evaluation; -1 runs the whole split.", ge=-1)


SECTIONS: dict[str, type] = {
    "job": Job, "model": Model, "optimizer": Optimizer, "lr_scheduler": LRScheduler, "training": Training,
    "parallelism": Parallelism, "checkpoint": Checkpoint, "activation_checkpoint": ActivationCheckpoint,
    "compile": Compile, "float8": Float8, "metrics": Metrics, "profiling": Profiling, "comm": Comm,
    "validation": Validation,
}


@dataclass
class JobConfig:
    """The whole run description; one attribute per TOML section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    float8: Float8 = field(default_factory=Float8)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)
    comm: Comm = field(default_factory=Comm)
    validation: Validation = field(default_factory=Validation)
