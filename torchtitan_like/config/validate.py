"""Checks that relate several config keys (and the model's shape); run before any distributed setup."""

from __future__ import annotations

from torchtitan_like.errors import ConfigError


def gradient_accumulation_steps(training, dp_degree: int) -> int:
    """Microbatches per optimizer step needed to reach training.global_batch_size."""
    per_step = training.local_batch_size * dp_degree
    if training.global_batch_size == -1:
        return 1
    if training.global_batch_size % per_step != 0:
        raise ConfigError(
            f"training.global_batch_size = {training.global_batch_size} must be a multiple of "
            f"training.local_batch_size ({training.local_batch_size}) x data-parallel degree ({dp_degree}) = {per_step}")
    return training.global_batch_size // per_step


FLOAT8_CONVERTERS = ("float8", "quantize.linear.float8")  # ours and TorchTitan 0.2's spelling


def validate_config(config, model_args) -> None:
    """Raise ConfigError for out-of-range or inconsistent values; `model_args` has its vocab set.
    Also resolves `model.converters`: a float8 converter sets `float8.enable = true`, so every later
    step (device check, module swap, saved config.toml) sees one switch."""
    training, lr = config.training, config.lr_scheduler
    if lr.warmup_steps > training.steps:
        raise ConfigError(f"lr_scheduler.warmup_steps = {lr.warmup_steps} is larger than training.steps = "
                          f"{training.steps}; warmup must fit in the run")
    if lr.decay_ratio != -1.0:
        if not 0.0 <= lr.decay_ratio <= 1.0:
            raise ConfigError(f"lr_scheduler.decay_ratio = {lr.decay_ratio}: must be -1 (decay after warmup) or in [0, 1]")
        if lr.warmup_steps + round(training.steps * lr.decay_ratio) > training.steps:
            raise ConfigError(f"lr_scheduler.warmup_steps ({lr.warmup_steps}) + decay_ratio x steps "
                              f"({round(training.steps * lr.decay_ratio)}) exceeds training.steps ({training.steps})")
    if training.seq_len > model_args.max_seq_len:
        raise ConfigError(f"training.seq_len = {training.seq_len} exceeds the model's maximum sequence length "
                          f"{model_args.max_seq_len} ({config.model.name} {config.model.flavor})")
    if config.validation.seq_len in (0, 1):  # as training.seq_len: an input and a shifted label need 2 tokens
        raise ConfigError(f"validation.seq_len = {config.validation.seq_len}: use -1 (training.seq_len) or at least 2")
    val_seq_len = config.validation.seq_len if config.validation.seq_len != -1 else training.seq_len
    if config.validation.enable and val_seq_len > model_args.max_seq_len:
        raise ConfigError(f"validation.seq_len = {val_seq_len} exceeds the model's maximum sequence length "
                          f"{model_args.max_seq_len}")
    if config.validation.steps == 0:
        raise ConfigError("validation.steps = 0: use a positive number of batches or -1 for the whole split")
    # -1 sentinels whose 0 would otherwise silently act as -1
    if training.global_batch_size == 0:
        raise ConfigError("training.global_batch_size = 0: use -1 (local_batch_size x data-parallel degree) or a "
                          "positive multiple of it")
    if config.parallelism.pipeline_parallel_layers_per_stage == 0:
        raise ConfigError("parallelism.pipeline_parallel_layers_per_stage = 0: use -1 (one stage per rank) or a "
                          "positive number of layers")
    if config.metrics.peak_flops != -1 and config.metrics.peak_flops <= 0:  # metrics.py treats any of them as -1
        raise ConfigError(f"metrics.peak_flops = {config.metrics.peak_flops:g}: use -1 (look the device up) or the "
                          f"device's peak FLOP/s, e.g. 989e12")
    if training.dataset in ("local", "tokenized", "huggingface") and not training.dataset_path:
        raise ConfigError(f"training.dataset = {training.dataset!r} needs training.dataset_path "
                          f"(a file, folder or glob{', or a dataset name' if training.dataset == 'huggingface' else ''})")
    # A prepare-data folder holds its own validation split: tokenized validation may default to it.
    validation_defaults_to_training = config.validation.dataset == training.dataset == "tokenized"
    if (config.validation.enable and config.validation.dataset != "builtin" and not config.validation.dataset_path
            and not validation_defaults_to_training):
        raise ConfigError(f"validation.dataset = {config.validation.dataset!r} needs validation.dataset_path")
    option = config.activation_checkpoint.selective_ac_option
    # isascii: str.isdecimal/isdigit also accept other scripts' digits, which int() may then refuse
    every_kth = option.isascii() and option.isdecimal() and int(option) > 0
    if config.activation_checkpoint.mode == "selective" and option != "op" and not every_kth:
        raise ConfigError(f"activation_checkpoint.selective_ac_option = {option!r}: must be a positive integer "
                          f"(checkpoint every k-th layer) or 'op'")
    if config.activation_checkpoint.mode == "selective" and every_kth and int(option) > model_args.n_layers:
        # layer i is checkpointed when (i + 1) % k == 0: none of them, silently the memory of mode "none"
        raise ConfigError(f"activation_checkpoint.selective_ac_option = {option!r} checkpoints one layer in every "
                          f"{int(option)}, but {config.model.name} {config.model.flavor} has {model_args.n_layers} "
                          f"layers: none would be checkpointed; use at most {model_args.n_layers}, 'op', or mode "
                          f"'none'")
    for component in config.compile.components:
        if component not in ("model", "loss"):
            raise ConfigError(f"compile.components contains {component!r}; allowed: model, loss")
    if config.compile.enable:
        _validate_compile_backend(config.compile.backend)
    for converter in config.model.converters:
        if converter not in FLOAT8_CONVERTERS:
            raise ConfigError(f"model.converters contains {converter!r}; allowed: {', '.join(FLOAT8_CONVERTERS)}")
        config.float8.enable = True
    if config.float8.enable:
        _validate_float8(config.float8, config.parallelism)
    if training.master_weights == "split":
        _validate_split_master_weights(config)


def _validate_compile_backend(backend: str) -> None:
    """An unknown backend fails only at the first compiled call otherwise, after the process group."""
    from torch._dynamo import list_backends, lookup_backend
    from torch._dynamo.exc import InvalidBackend

    try:
        lookup_backend(backend)
    except InvalidBackend:
        raise ConfigError(f"compile.backend = {backend!r} is not a torch.compile backend; "
                          f"allowed: {', '.join(list_backends())} (or a debug backend such as eager, aot_eager)") from None


def _validate_split_master_weights(config) -> None:
    """Split master weights are bf16 halves that only the Triton optimizer step updates whole."""
    if config.training.mixed_precision_param != "bfloat16":
        raise ConfigError(f"training.master_weights = 'split' computes in bfloat16; training.mixed_precision_param = "
                          f"{config.training.mixed_precision_param!r}: set it to 'bfloat16' or master_weights = 'float32'")
    if config.optimizer.implementation not in ("auto", "triton"):
        raise ConfigError(f"training.master_weights = 'split' needs the Triton optimizer step, which updates both "
                          f"halves; optimizer.implementation = {config.optimizer.implementation!r}: set it to 'auto' "
                          f"or 'triton'")


def _validate_float8(float8, parallelism) -> None:
    from torchtitan_like.kernels.float8.convert import validate_float8_config

    validate_float8_config(float8, parallelism)
    if (float8.enable_fsdp_float8_all_gather and parallelism.data_parallel_shard_degree == 1
            and parallelism.data_parallel_replicate_degree == 1):
        from torchtitan_like.logging import logger

        logger.info("float8.enable_fsdp_float8_all_gather has no effect without FSDP (data-parallel degree 1)")
