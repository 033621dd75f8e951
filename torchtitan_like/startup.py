"""Start-up checks: every check of user input, run before any process group exists.

`Trainer.__init__` runs `check_user_inputs` on every rank; `python -m torchtitan_like.train
--check-config` runs it once in one process, which the launchers do before torchrun, so a mistake is
reported once with exit code 2. Also the resolutions the checks need on the way (model arguments,
attention kernels), which the Trainer then builds on.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from torchtitan_like.config import gradient_accumulation_steps, validate_config
from torchtitan_like.data import build_tokenizer, check_dataset_paths
from torchtitan_like.distributed.setup import resolve_device
from torchtitan_like.errors import ConfigError
from torchtitan_like.models import get_model_spec
from torchtitan_like.parallelisms.parallel_dims import ParallelDims


def resolve_model_args(config, tokenizer):
    """The model's hyper-parameters for the configured flavor, with vocab and norm from the config."""
    spec = get_model_spec(config.model.name)
    model_args = spec.args_for(config.model.flavor)
    if config.model.vocab_size == -1:
        model_args.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size}); use -1 to follow the tokenizer or a larger value to pad")
    else:
        model_args.vocab_size = config.model.vocab_size
    model_args.norm_type = config.model.norm_type
    model_args.attn_mask_type = config.model.attn_mask_type
    model_args.document_start_id = tokenizer.bos_id
    return spec, model_args


def build_model_on_meta(config, spec, model_args, parallel_dims: ParallelDims) -> torch.nn.Module:
    """The whole model on the meta device (no memory) with the conversions applied before the
    parallel plan (Float8 linears): what the trainer and the plan dry-run then parallelize, and
    whose state-dict names and shapes the start-up checks compare with a checkpoint."""
    with torch.device("meta"):
        model = spec.model_cls(model_args)
    if config.float8.enable:
        from torchtitan_like.kernels.float8 import convert_to_float8

        convert_to_float8(model, config.float8, weights_sharded=parallel_dims.dp_shard > 1)
    return model


def resolve_sdpa_backends(choice: str, device: torch.device) -> tuple[str, ...]:
    """`model.sdpa_backend` -> the attention kernels the model may use, in priority order. A named
    kernel is the only one allowed (an error where it cannot run). auto: on Hopper (sm90) cuDNN first,
    then PyTorch's order, as TorchTitan does (cuDNN's attention is reported 1.7-2.3x faster than
    flash there for training shapes, and slower on other architectures); elsewhere PyTorch chooses."""
    if choice != "auto":
        if device.type == "cpu" and choice not in ("flash", "math"):
            raise ConfigError(f"model.sdpa_backend = {choice!r} has no CPU kernel; on CPU use auto, flash or math")
        return (choice,)
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9:
        return ("cudnn", "flash", "efficient", "math")
    return ()


def check_attention_mask(config, backends: tuple[str, ...], device: torch.device) -> None:
    """ConfigError for a block-causal mask where it cannot apply: flash attention on CUDA takes no mask."""
    if config.model.attn_mask_type == "causal":
        return
    if device.type == "cuda" and backends == ("flash",):
        raise ConfigError("model.attn_mask_type = 'block_causal' needs an attention kernel that takes a mask; "
                          "model.sdpa_backend = 'flash' does not on CUDA: use auto, cudnn, efficient or math")


def supports_native_gqa(backends: tuple[str, ...], device: torch.device, masked: bool = False) -> bool:
    """Whether attention may pass `enable_gqa` instead of repeating K/V: every CPU kernel supports
    it; on CUDA cuDNN and flash do (sm80+), the memory-efficient kernel does not. On an H200 cuDNN
    ran 532 TFLOP/s with it against 513 with repeated K/V (docs/benchmarks.md); TorchTitan passes it."""
    if device.type != "cuda":
        return True
    if masked:  # a block-causal mask rules flash out, and cuDNN may refuse it: the efficient kernel may run
        return False
    if torch.cuda.get_device_capability(device)[0] < 8:
        return False
    return not backends or any(name in backends for name in ("cudnn", "flash"))


def check_checkpoint_inputs(config, world_size: int) -> None:
    """The checkpoint settings the manager and the trainer would refuse only once the process group,
    data and model exist: an unknown excluded state, a seed checkpoint on several processes, and an
    `initial_load_path` that does not exist for a run that has no checkpoint of its own yet (a run
    that has one resumes from it and never reads the path)."""
    from torchtitan_like.checkpoint.state import TRAIN_STATE_KEY, check_excluded_states

    checkpoint = config.checkpoint
    # The trainer's CheckpointManager gets the TrainState as its one extra state.
    check_excluded_states(checkpoint.exclude_from_loading, (TRAIN_STATE_KEY,))
    if checkpoint.create_seed_checkpoint and world_size > 1:
        raise ConfigError(f"checkpoint.create_seed_checkpoint = true runs on a single process; this run has "
                          f"{world_size}: launch it with one (e.g. NGPU=1)")
    if checkpoint.enable and checkpoint.initial_load_path and not os.path.isdir(checkpoint.initial_load_path):
        root = os.path.join(config.job.dump_folder, checkpoint.folder)
        if not (os.path.isdir(root) and os.listdir(root)):
            raise ConfigError(f"checkpoint.initial_load_path = {checkpoint.initial_load_path!r} does not exist or is "
                              f"not a folder, and {root} holds no checkpoint to resume from")


class CheckedInputs(NamedTuple):
    """What the start-up checks resolve on the way, and the Trainer builds on."""
    tokenizer: object
    spec: object
    model_args: object
    parallel_dims: ParallelDims
    grad_accum_steps: int
    device: torch.device


def host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return None


def check_batches_fit_in_host_memory(config, host_bytes: int | None = None) -> None:
    """ConfigError for a batch whose token ids alone (int64 inputs and labels) would not fit in this
    machine's memory: without the check, the dataloader spends minutes gathering the samples before
    the machine runs out of memory (a typo such as local_batch_size = 10000000)."""
    host_bytes = host_memory_bytes() if host_bytes is None else host_bytes
    if not host_bytes:
        return
    seq_len = config.training.seq_len
    batches = [("training.local_batch_size", config.training.local_batch_size, "training.seq_len", seq_len)]
    if config.validation.enable:
        batches.append(("validation.local_batch_size", config.validation.local_batch_size,
                        "validation.seq_len" if config.validation.seq_len > 0 else "training.seq_len",
                        config.validation.seq_len if config.validation.seq_len > 0 else seq_len))
    for batch_key, batch, seq_key, length in batches:
        needed = 2 * 8 * batch * length
        if needed > host_bytes:
            raise ConfigError(f"{batch_key} = {batch} with {seq_key} = {length}: one batch's token ids (int64 inputs "
                              f"and labels) take {needed / 2**30:,.1f} GiB, more than this machine's "
                              f"{host_bytes / 2**30:,.1f} GiB of memory; a local batch is what one rank computes "
                              f"per forward (global_batch_size sets the batch per optimizer step)")


def check_user_inputs(config, world_size: int) -> CheckedInputs:
    """Every check of user input, for a run of `world_size` processes, before any process group
    exists: a mistake raises one ConfigError (exit 2) instead of failing a collective. Creates the
    dump folder and nothing else. Trainer.__init__ runs it on every rank, and `train --check-config`
    once in one process before the launchers start torchrun."""
    try:
        os.makedirs(config.job.dump_folder, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"job.dump_folder = {config.job.dump_folder!r} cannot be created: "
                          f"{error.strerror or error}") from None
    tokenizer = build_tokenizer(config.model)
    spec, model_args = resolve_model_args(config, tokenizer)
    validate_config(config, model_args)
    if config.checkpoint.enable and config.checkpoint.initial_load_path:
        from torchtitan_like.checkpoint.hf_convert import check_imported_architecture

        check_imported_architecture(config.checkpoint.initial_load_path, config.model.name, model_args)
    parallel_dims = ParallelDims.from_config(config.parallelism, world_size)
    parallel_dims.validate_model(model_args, config.training, config.parallelism, config.validation)
    grad_accum_steps = gradient_accumulation_steps(config.training, parallel_dims.dp)
    check_dataset_paths(config, tokenizer, parallel_dims.dp)
    check_batches_fit_in_host_memory(config)
    device = resolve_device(config.training.device)
    model_args.sdpa_backends = resolve_sdpa_backends(config.model.sdpa_backend, device)
    check_attention_mask(config, model_args.sdpa_backends, device)
    model_args.sdpa_native_gqa = supports_native_gqa(model_args.sdpa_backends, device,
                                                     masked=config.model.attn_mask_type != "causal")
    parallel_dims.validate_features(config.parallelism, config.compile, device.type,
                                    cpu_offload=config.training.enable_cpu_offload,
                                    master_weights=config.training.master_weights,
                                    activation_checkpoint=config.activation_checkpoint,
                                    sdpa_backends=model_args.sdpa_backends)
    if config.float8.enable:
        from torchtitan_like.kernels.float8 import check_float8_support

        check_float8_support(device, config.float8)
    check_checkpoint_inputs(config, world_size)
    return CheckedInputs(tokenizer, spec, model_args, parallel_dims, grad_accum_steps, device)
