"""The trainer: builds every piece from the config, then runs the training loop.

The step reads like the algorithm: fetch batch, forward, loss, backward, clip, step, schedule, log,
validate, checkpoint. Parallel plans, kernels, checkpointing and metrics are called, not inlined.
Construction order matters and is fixed here:
config checks -> process group + mesh -> data -> model on meta -> converters -> parallelize
-> materialize + seeded init -> optimizer + LR schedule -> checkpoint manager -> metrics;
`train()` then resumes from the newest complete checkpoint before the first step.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import time

import torch
import torch.distributed as dist

from torchtitan_like.checkpoint import TRAIN_STATE_KEY, CheckpointManager, TrainState, create_seed_checkpoint
from torchtitan_like.config.manager import changes_since, to_toml
from torchtitan_like.data import build_dataloader
from torchtitan_like.distributed.setup import (destroy_process_group, init_process_group, set_group_timeouts,
                                               set_train_timeout, startup_timeout, world_info)
from torchtitan_like.errors import ConfigError
from torchtitan_like.fault_injection import maybe_inject_fault
from torchtitan_like.filesystem import describe, write_text_atomically
from torchtitan_like.kernels.float8.fsdp import precompute_float8_scales
from torchtitan_like.logging import logger
from torchtitan_like.master_weights import accumulate_gradients_in_fp32, convert_to_split
from torchtitan_like.losses import cross_entropy_loss
from torchtitan_like.metrics import MetricsLogger
from torchtitan_like.optim import build_lr_scheduler, build_optimizer, reapply_optimizer_config
from torchtitan_like.preemption import Preempted, PreemptionWatcher
from torchtitan_like.startup import build_model_on_meta, check_user_inputs
from torchtitan_like.profiling import maybe_enable_memory_snapshot, maybe_enable_profiling
from torchtitan_like.distributed.tensors import full_tensor
from torchtitan_like.parallelisms.grad_clip import clip_grad_norm
from torchtitan_like.parallelisms.pipeline import pipeline_forward_backward
from torchtitan_like.parallelisms.tensor_parallel import loss_parallel_context

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class Trainer:
    def __init__(self, config):
        self.config = config
        rank, _, world_size = world_info()
        self.rank = rank
        self.finished = False  # train() returned or stopped on preemption, on every rank alike
        # --- every user-input check happens before the process group exists
        (self.tokenizer, self.spec, self.model_args, self.parallel_dims, self.grad_accum_steps,
         self.device) = check_user_inputs(config, world_size)
        self.split_master_weights = config.training.master_weights == "split"

        # --- distributed setup
        init_process_group(self.device, config.comm)
        self.mesh = self.parallel_dims.build_mesh(self.device.type)
        set_group_timeouts(config.comm.init_timeout_seconds, self.mesh)
        self.dp_rank, self.dp_degree = self._data_parallel_coordinates()
        self._seed_everything(config.training.seed)

        # --- data
        self.dataloader = build_dataloader(config, self.tokenizer, self.dp_rank, self.dp_degree, split="train")
        self.val_dataloader = None
        if config.validation.enable:
            self.val_dataloader = build_dataloader(config, self.tokenizer, self.dp_rank, self.dp_degree,
                                                   split="validation")

        # --- model: meta -> convert -> parallelize -> materialize -> seeded init
        model = build_model_on_meta(config, self.spec, self.model_args, self.parallel_dims)
        # Split master weights compute in bf16 on any device (their tests run on CPU).
        on_gpu_or_split = self.device.type == "cuda" or self.split_master_weights
        self.param_dtype = _DTYPES[config.training.mixed_precision_param] if on_gpu_or_split else torch.float32
        self.loss_fn = cross_entropy_loss
        if config.compile.enable and "loss" in config.compile.components:
            self.loss_fn = torch.compile(cross_entropy_loss, backend=config.compile.backend)
        # Vocab-sharded logits stay sharded through the loss (tensor_parallel.py).
        self.loss_parallel = self.parallel_dims.tp_enabled and not config.parallelism.disable_loss_parallel
        if config.model.print_after_conversion and rank == 0:
            logger.info(f"model after conversion:\n{model}")
        self.pipeline = None
        self.model_parts = self._parallelize(model)
        for part in self.model_parts:
            part.to_empty(device=self.device)
            part.init_weights(seed=config.training.seed, buffer_device=self.device)
            part.train()
        if self.split_master_weights:
            convert_to_split(self.model_parts)
            if self.grad_accum_steps > 1:  # microbatches summed in fp32, as autocast's fp32 gradients are
                accumulate_gradients_in_fp32(self.model_parts)
        self.num_params = sum(p.numel() for p in self.model_args_param_source())
        self.optimizer = build_optimizer(self.model_parts, config.optimizer, self.device.type)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, config.lr_scheduler, config.training.steps)
        self.train_state = TrainState()
        self.train_timeout_set = False  # start-up collectives keep comm.init_timeout_seconds until step 1 ends
        self.validated_once = False  # the first validation compiles, so it gets that timeout again
        # Checks that the checkpoint folder is writable before any training step.
        self.checkpointer = CheckpointManager(config.checkpoint, config.job.dump_folder, self.model_parts,
                                              self.optimizer, self.lr_scheduler, self.dataloader,
                                              extra_states={TRAIN_STATE_KEY: self.train_state}, dp_rank=self.dp_rank)
        self.metrics = MetricsLogger(config.metrics, config.job.dump_folder, self.device,
                                     self.model_args.flops_per_token(config.training.seq_len),
                                     config.training.steps, rank)
        if config.job.description:
            logger.info(f"job: {config.job.description}")
        logger.info(f"model {config.model.name} {config.model.flavor}: {self.model_args.num_params():,} parameters, "
                    f"vocab {self.model_args.vocab_size}, device {self.device}, world {world_size}, "
                    f"mesh {self.parallel_dims.mesh_shape() or 'none'}, grad accumulation {self.grad_accum_steps}, "
                    f"attention kernels {'/'.join(self.model_args.sdpa_backends) or 'PyTorch default'}, "
                    f"{self.model_args.attn_mask_type} mask"
                    + (", split master weights (bf16 parameters + int16 remainders)" if self.split_master_weights else ""))

    # ------------------------------------------------------------------ construction helpers
    @property
    def step(self) -> int:
        return self.train_state.step

    @step.setter
    def step(self, value: int) -> None:
        self.train_state.step = value

    @property
    def tokens_seen(self) -> int:
        return self.train_state.tokens_seen

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self.train_state.tokens_seen = value

    def model_args_param_source(self):
        return (p for part in self.model_parts for p in part.parameters())

    def _data_parallel_coordinates(self) -> tuple[int, int]:
        if self.mesh is None or not self.parallel_dims.dp_enabled:
            return 0, 1
        dp_mesh = self.dp_mesh
        return dp_mesh.get_local_rank(), dp_mesh.size()

    @property
    def dp_mesh(self):
        if self.mesh is None or not self.parallel_dims.dp_enabled:
            return None
        for name in ("dp", "dp_shard", "dp_replicate"):
            if _has_dim(self.mesh, name):
                return self.mesh[name]
        return None

    def _seed_everything(self, seed: int) -> None:
        """torch (CPU and every GPU) and Python's `random`, whose states checkpoints save and restore."""
        torch.manual_seed(seed)
        random.seed(seed)
        if self.config.training.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            if torch.cuda.is_available():
                torch.backends.cudnn.deterministic = True
                torch.backends.cudnn.benchmark = False

    def _parallelize(self, model) -> list:
        """Apply the model's parallel plan (TP, AC, compile, FSDP), per pipeline stage under PP;
        returns the model parts (this rank's stages, or the one whole model)."""
        if self.parallel_dims.pp_enabled:
            if self.spec.pipelining_fn is None:
                raise ConfigError(f"model {self.config.model.name} has no pipelining function; "
                                  f"set parallelism.pipeline_parallel_degree = 1")
            self.pipeline = self.spec.pipelining_fn(model, self.parallel_dims, self.mesh, self.config, self.device,
                                                    self.loss_fn, self.grad_accum_steps)
            return self.pipeline.model_parts
        if self.spec.parallelize_fn is None:
            if self.parallel_dims.world_size > 1:
                raise ConfigError(f"model {self.config.model.name} has no parallelize function; run one process")
            return [model]
        return [self.spec.parallelize_fn(model, self.parallel_dims, self.mesh, self.config)]

    def _compute_context(self):
        """bf16 autocast when no FSDP mixed-precision policy casts the parameters (one GPU) and
        they are not split master weights' bf16 halves already."""
        stack = contextlib.ExitStack()
        if (self.device.type == "cuda" and self.param_dtype != torch.float32 and not self.parallel_dims.fsdp_enabled
                and not self.split_master_weights):
            stack.enter_context(torch.autocast("cuda", dtype=self.param_dtype))
        return stack

    # ------------------------------------------------------------------ the loop
    def next_batch(self, data_iterator):
        inputs, labels = next(data_iterator)
        return inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward, loss and backward of one accumulation step; returns its share of the mean loss."""
        if self.pipeline is not None:
            # The schedule runs forward, loss and backward of every pipeline microbatch.
            with self._compute_context(), loss_parallel_context(self.loss_parallel):
                return pipeline_forward_backward(self.pipeline, inputs, labels)
        model = self.model_parts[0]
        with self._compute_context():
            logits = model(inputs)
        with loss_parallel_context(self.loss_parallel):
            # Mean over this microbatch's tokens, divided so accumulated gradients average microbatches.
            loss = self.loss_fn(logits, labels) / self.grad_accum_steps
            del logits
            loss.backward()
        return full_tensor(loss.detach())

    def clip_gradients(self) -> torch.Tensor:
        return clip_grad_norm([p for part in self.model_parts for p in part.parameters()],
                              self.config.training.max_norm, self.parallel_dims, self.mesh, optimizer=self.optimizer)

    @property
    def tokens_per_device_step(self) -> float:
        """Tokens one optimizer step processes per device: a data-parallel rank's batch is shared by
        its tensor- and pipeline-parallel ranks, so they split it (as TorchTitan counts)."""
        local_tokens = self.config.training.local_batch_size * self.config.training.seq_len * self.grad_accum_steps
        return local_tokens / self.parallel_dims.non_data_parallel_size

    def _write_config(self) -> None:
        """Rank 0 writes the resolved config beside the run's outputs (the folder exists: __init__),
        whole or not at all. A failed write (a full disk) is a warning: the file records the run, and
        rank 0 stopping alone here would leave the other ranks to fail in the first collective."""
        if self.rank != 0:
            return
        path = os.path.join(self.config.job.dump_folder, "config.toml")
        try:
            write_text_atomically(path, to_toml(self.config))
        except OSError as error:
            logger.warning(f"could not write {path}: {describe(error, path)}; training goes on (an earlier "
                           f"config.toml there is left as it was)")

    def train_step(self, data_iterator) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """One optimizer step; returns (loss, grad norm, seconds waiting on data, the LR this step used)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.zeros((), device=self.device)
        data_seconds = 0.0
        for _ in range(self.grad_accum_steps):
            start = time.perf_counter()
            inputs, labels = self.next_batch(data_iterator)
            data_seconds += time.perf_counter() - start
            self.tokens_seen += labels.numel() * self.dp_degree  # global count (equal batches per rank)
            loss += self.forward_backward(inputs, labels)
        grad_norm = self.clip_gradients()
        lr = self.optimizer.param_groups[0]["lr"]  # read before the scheduler moves on to the next step's
        self.optimizer.step()
        if self.config.float8.precompute_float8_dynamic_scale_for_fsdp:
            precompute_float8_scales(self.model_parts, self.param_dtype)
        self.lr_scheduler.step()
        return loss, grad_norm, data_seconds, lr

    def reduce_loss(self, loss: torch.Tensor) -> float:
        """Mean of the per-rank losses over data-parallel ranks (equal token counts per rank)."""
        if self.dp_mesh is not None:
            loss = loss.clone()
            dist.all_reduce(loss, op=dist.ReduceOp.AVG if self.device.type == "cuda" else dist.ReduceOp.SUM,
                            group=self.dp_mesh.get_group())
            if self.device.type != "cuda":
                loss /= self.dp_degree  # gloo has no AVG
        return loss.item()

    def validate(self) -> float:
        from torchtitan_like.validation import evaluate

        return evaluate(self)

    def _validate_in_loop(self) -> float:
        """The first validation compiles the forward-only graphs (and builds the evaluation stages under
        PP): it runs under the start-up collective timeout, the later ones under the training one."""
        if self.validated_once:
            return self.validate()
        self.validated_once = True
        with startup_timeout(self.config.comm, self.mesh):
            return self.validate()

    def train(self) -> list[float]:
        """Run to training.steps (resuming from the newest checkpoint); returns every step's
        data-parallel averaged loss, restored ones included. Raises `Preempted` after saving when a
        preemption signal arrived."""
        config = self.config
        if config.checkpoint.create_seed_checkpoint:
            self._write_config()
            path = create_seed_checkpoint(config.checkpoint, config.job.dump_folder, self.model_parts)
            logger.info(f"seed checkpoint written to {path}")
            return []
        self.step = self.checkpointer.load()
        if self.step:
            logger.info(f"resumed from step {self.step} ({self.tokens_seen:,} tokens seen)")
            if self.rank == 0:  # what this relaunch changed, read before _write_config replaces the file
                for line in changes_since(os.path.join(config.job.dump_folder, "config.toml"), config):
                    logger.info(f"config changed since this run's last launch: {line}")
            reapply_optimizer_config(self.optimizer, self.lr_scheduler, config.optimizer)
        # After the load: a relaunch whose config does not fit the run's checkpoint stops there and
        # leaves the run's config.toml as it was.
        self._write_config()
        if self.step >= config.training.steps:  # e.g. a finished job requeued or restarted
            logger.info(f"training already finished: checkpoint step {self.step} >= training.steps = "
                        f"{config.training.steps}; nothing to train"
                        + ("" if self.step == config.training.steps else
                           " (a lower training.steps does not roll the run back: to go back to an earlier "
                           "checkpoint, set checkpoint.load_step or remove the later step folders)"))
            self.finished = True
            return list(self.train_state.losses)
        data_iterator = iter(self.dataloader)
        watcher = PreemptionWatcher(self.device)
        pending: list[torch.Tensor] = []  # losses not yet read back: no device sync every step
        gc.disable()
        try:
            with maybe_enable_profiling(config.profiling, config.job.dump_folder, self.step, self.rank) as profiler, \
                    maybe_enable_memory_snapshot(config.profiling, config.job.dump_folder, self.step,
                                                 self.rank) as snapshot:
                while self.step < config.training.steps:
                    self.step += 1
                    if self.step % config.training.gc_freq == 0:
                        gc.collect(1)
                    loss, grad_norm, data_seconds, lr = self.train_step(data_iterator)
                    if not self.train_timeout_set:
                        set_train_timeout(config.comm, self.mesh)
                        self.train_timeout_set = True
                    maybe_inject_fault(self.rank, self.step, "train")
                    self.metrics.record_step(self.tokens_per_device_step, data_seconds)
                    pending.append(loss)
                    last = self.step == config.training.steps
                    if self.metrics.should_log(self.step) or self.checkpointer.should_save(self.step, last):
                        self._record_losses(pending)
                        if self.metrics.should_log(self.step):
                            self.metrics.log(self.step, self.train_state.losses[-1], float(grad_norm), lr)
                    if self.val_dataloader is not None and (self.step % config.validation.freq == 0 or last):
                        self.metrics.log_validation(self.step, self._validate_in_loop())
                    saved_now = self.checkpointer.save(self.step, last=last)
                    profiler.step()
                    snapshot.step()
                    if not last and watcher.should_stop():
                        self._record_losses(pending)
                        if saved_now:  # the interval save of this step: commit it, do not write it twice
                            logger.info(f"preempted: step {self.step} was just saved; committing it and stopping")
                            self.checkpointer.maybe_wait()
                            saved = True
                        else:
                            logger.info(f"preempted: saving step {self.step} and stopping")
                            saved = self.checkpointer.save(self.step, force=True)
                        self.finished = True
                        raise Preempted(self.step, saved=saved)
            self._record_losses(pending)
        finally:
            gc.enable()
            watcher.restore()
        self.finished = True
        return list(self.train_state.losses)

    def _record_losses(self, pending: list[torch.Tensor]) -> None:
        """Average the pending per-step losses over data-parallel ranks, append them to the train
        state (saved in checkpoints) and stop on a non-finite loss."""
        first_step = self.step - len(pending) + 1
        for offset, loss in enumerate(pending):
            value = self.reduce_loss(loss)
            if not torch.isfinite(torch.tensor(value)):
                raise RuntimeError(f"loss is {value} at step {first_step + offset}: training diverged")
            self.train_state.losses.append(value)
        pending.clear()

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()
        if self.finished and dist.is_initialized():
            # Leave together: a rank that tears gloo down while a peer is still inside it can make the
            # peer abort at exit ("terminate called without an active exception", seen in CI after a
            # finished run). Only after a normal end: a rank that failed alone must exit at once.
            dist.barrier()
        destroy_process_group()



def _has_dim(mesh, name: str) -> bool:
    """Whether `mesh[name]` resolves (a named or flattened dim)."""
    try:
        mesh[name]
        return True
    except (KeyError, RuntimeError, ValueError):
        return False
