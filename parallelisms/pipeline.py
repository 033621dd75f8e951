"""Pipeline parallel with `torch.distributed.pipelining`: stages, schedules and the pipelined step.

The model is cut by layers into stages (`models/<name>/pipeline.py` decides the cut); each rank of
the `pp` mesh dim runs one stage (GPipe, 1F1B) or several "virtual" stages (Interleaved1F1B,
LoopedBFS, InterleavedZeroBubble: stages r, r + pp, ...; ZBVZeroBubble: the V shape r and
2 pp - 1 - r). A local batch is split into `local_batch_size / pipeline_parallel_microbatch_size`
microbatches that flow through the stages; the schedule runs forward, loss and backward of every
microbatch and only activations/gradients of stage boundaries cross ranks (point-to-point).

Loss scaling: the schedule backpropagates each microbatch's loss and the gradients add up, so each
microbatch's mean loss is divided by n_microbatches x grad_accum_steps; the sum over microbatches
and accumulation steps is then exactly the mean loss of the non-pipelined step, and so are the
gradients. The schedule's own gradient scaling is switched off so it is applied once.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, get_schedule_class

from torchtitan_like.distributed.tensors import full_tensor
from torchtitan_like.errors import ConfigError


@dataclass
class Pipeline:
    """What the trainer needs to run a pipelined step on this rank."""

    schedule: object
    stages: list[PipelineStage]
    model_parts: list[nn.Module]
    pp_group: dist.ProcessGroup
    has_first_stage: bool
    has_last_stage: bool
    n_microbatches: int
    loss_scale: float  # 1 / (n_microbatches * grad_accum_steps), see the module docstring
    returns_outputs_optionally: bool = False  # the schedule's step takes return_outputs (see _run_schedule)
    # The microbatch shape the training schedule has run with, and builds of this rank's stages and
    # schedule for evaluation batches of another shape (pipeline_evaluate).
    train_microbatch_shape: tuple[int, ...] | None = None
    rebuild: object = None
    eval_pipelines: dict = field(default_factory=dict)


def stage_ids_for_rank(pp_rank: int, pp_degree: int, num_stages: int, v_shape: bool) -> list[int]:
    """The stage indices this pp rank runs: looped (r, r + pp, ...) or V-shaped (r, 2 pp - 1 - r)."""
    if v_shape:
        return [pp_rank, 2 * pp_degree - 1 - pp_rank]
    return list(range(pp_rank, num_stages, pp_degree))


class ScaledLoss:
    """loss_fn(outputs, labels) x scale: the per-microbatch loss the schedule backpropagates."""

    def __init__(self, loss_fn, scale: float):
        self.loss_fn, self.scale = loss_fn, scale

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(outputs, labels) * self.scale


def build_pipeline(stage_modules: dict[int, nn.Module], num_stages: int, schedule_name: str, n_microbatches: int,
                   grad_accum_steps: int, loss_fn, pp_mesh, device: torch.device) -> Pipeline:
    """Wrap this rank's stage modules (stage index -> module, already parallelized) in
    `PipelineStage`s and build the named schedule over them."""
    group = pp_mesh.get_group()
    stages = [PipelineStage(module, index, num_stages, device, group=group) for index, module in stage_modules.items()]
    loss_scale = 1.0 / (n_microbatches * grad_accum_steps)
    schedule_class = get_schedule_class(schedule_name)
    # Scaling is in the loss (module docstring); older torch has no scale_grads and does not scale.
    options = {"scale_grads": False} if "scale_grads" in inspect.signature(schedule_class.__init__).parameters else {}
    if issubclass(schedule_class, PipelineScheduleMulti):
        schedule = schedule_class(stages, n_microbatches=n_microbatches, loss_fn=ScaledLoss(loss_fn, loss_scale),
                                  **options)
    else:
        if len(stages) != 1:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule_name!r} runs one stage per rank, "
                              f"got {len(stages)}")
        schedule = schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=ScaledLoss(loss_fn, loss_scale),
                                  **options)

    def rebuild() -> Pipeline:
        return build_pipeline(stage_modules, num_stages, schedule_name, n_microbatches, grad_accum_steps, loss_fn,
                              pp_mesh, device)

    return Pipeline(schedule=schedule, stages=stages, model_parts=list(stage_modules.values()), pp_group=group,
                    has_first_stage=any(stage.is_first for stage in stages),
                    has_last_stage=any(stage.is_last for stage in stages), n_microbatches=n_microbatches,
                    loss_scale=loss_scale,
                    returns_outputs_optionally="return_outputs" in inspect.signature(schedule.step).parameters,
                    rebuild=rebuild)


def _run_schedule(run, pipeline: Pipeline, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Call `run` (schedule.step or .eval) with what this rank's stages need; return the summed
    scaled microbatch losses, shared over `pp` so that every rank reports the same value."""
    losses: list | None = [] if pipeline.has_last_stage else None
    target = labels if pipeline.has_last_stage else None
    # By default the last stage keeps every microbatch's logits (batch x seq x vocab each) until the
    # next step and concatenates them into a whole-batch copy that we would discard: only the losses
    # are needed. Older torch has no return_outputs (and keeps them).
    options = {"return_outputs": False} if pipeline.returns_outputs_optionally else {}
    if any(getattr(getattr(part, "args", None), "attn_mask_type", "causal") == "block_causal"
           for part in pipeline.model_parts):
        # Every stage builds the block-causal mask from its microbatch's tokens: keyword arguments
        # of step() reach every stage, split into microbatches like the inputs.
        options["document_tokens"] = inputs
    if pipeline.has_first_stage:
        run(inputs, target=target, losses=losses, **options)
    else:
        run(target=target, losses=losses, **options)
    if pipeline.has_last_stage:
        loss = torch.stack([full_tensor(mb_loss.detach()) for mb_loss in losses]).sum()
    else:
        loss = torch.zeros((), device=labels.device)
    # Only the last stage computes the loss; the other ranks contribute zero.
    dist.all_reduce(loss, op=dist.ReduceOp.SUM, group=pipeline.pp_group)
    return loss


def pipeline_forward_backward(pipeline: Pipeline, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One accumulation step through the pipeline; gradients accumulate in the stage modules.
    Returns this step's share of the mean loss (loss / grad_accum_steps)."""
    if pipeline.train_microbatch_shape is None:
        pipeline.train_microbatch_shape = _microbatch_shape(pipeline, labels)
    return _run_schedule(pipeline.schedule.step, pipeline, inputs, labels)


def _microbatch_shape(pipeline: Pipeline, labels: torch.Tensor) -> tuple[int, ...]:
    return (labels.shape[0] // pipeline.n_microbatches, *labels.shape[1:])


@torch.no_grad()
def pipeline_evaluate(pipeline: Pipeline, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean loss of one batch, forward only (the schedule's `eval`)."""
    if not hasattr(pipeline.schedule, "eval"):
        raise ConfigError("validation with pipeline parallel needs a torch whose pipeline schedules have eval(); "
                          "set validation.enable = false")
    # A stage learns its inputs' shapes from its first run, and torch before 2.12 keeps them: a batch of
    # another shape fails there (PipeliningShapeError, or receive buffers of the wrong size). So
    # evaluation batches whose microbatches differ from training's (validation.local_batch_size or
    # seq_len) run through stages and a schedule of their own over the same modules, built at the
    # first such batch (the data loaders drop partial batches: one build per run).
    shape = _microbatch_shape(pipeline, labels)
    runner = pipeline
    if shape != pipeline.train_microbatch_shape:  # (None: evaluation before any training step)
        if shape not in pipeline.eval_pipelines:
            pipeline.eval_pipelines[shape] = pipeline.rebuild()
        runner = pipeline.eval_pipelines[shape]
    # The scaled microbatch losses sum to (batch mean) / grad_accum_steps; undo that factor.
    return _run_schedule(runner.schedule.eval, runner, inputs, labels) / (runner.loss_scale * runner.n_microbatches)
