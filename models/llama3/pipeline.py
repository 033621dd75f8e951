"""Llama 3 cut into pipeline stages by layer.

Stage s owns a contiguous range of `layers`; the first stage also owns `tok_embeddings`, the last
`norm` and `output`. A stage is a deep copy of the meta-device model with everything it does not
own removed (set to None / deleted from the `layers` ModuleDict), so parameter names stay those of
the full model and checkpoints and seeded init line up across any split.
"""

from __future__ import annotations

import copy

from torch import nn

from torchtitan_like.models.llama3.parallelize import parallelize_llama
from torchtitan_like.parallelisms.pipeline import Pipeline, build_pipeline, stage_ids_for_rank


def stage_layer_ranges(n_layers: int, num_stages: int, split_points: list[str]) -> list[range]:
    """Layer indices of each stage: from split points ("layers.N" starts a stage), else an even
    split with the remainder going to the middle stages, then to the first; never to the last, whose
    output projection (dim x vocab: 2.4 layers of Llama 3 8B) already makes it the slowest, while
    the first stage's embedding is a lookup."""
    if split_points:
        boundaries = [0] + [int(point.split(".")[1]) for point in split_points] + [n_layers]
    else:
        base, extra = divmod(n_layers, num_stages)
        # extra < num_stages, so the middle stages and the first take all of it
        takers = [*range(1, num_stages - 1), 0][:extra]
        sizes = [base + (1 if stage in takers else 0) for stage in range(num_stages)]
        boundaries = [0]
        for size in sizes:
            boundaries.append(boundaries[-1] + size)
    return [range(start, end) for start, end in zip(boundaries[:-1], boundaries[1:])]


def split_stage(model: nn.Module, layers: range, is_first: bool, is_last: bool) -> nn.Module:
    """A copy of the (meta-device) `model` holding only `layers` and its end modules."""
    stage = copy.deepcopy(model)
    if not is_first:
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
    for name in list(stage.layers.keys()):
        if int(name) not in layers:
            del stage.layers[name]
    return stage


def pipeline_llama(model: nn.Module, parallel_dims, mesh, job_config, device, loss_fn,
                   grad_accum_steps: int) -> Pipeline:
    """Split `model` into this rank's stages, parallelize each (TP, AC, compile, FSDP) and build
    the schedule."""
    parallelism = job_config.parallelism
    num_stages = parallel_dims.pipeline_num_stages(model.args.n_layers, parallelism)
    if parallelism.pipeline_parallel_layers_per_stage > 0:
        per_stage = parallelism.pipeline_parallel_layers_per_stage
        split_points = [f"layers.{index}" for index in range(per_stage, model.args.n_layers, per_stage)]
    else:
        split_points = parallelism.pipeline_parallel_split_points
    layer_ranges = stage_layer_ranges(model.args.n_layers, num_stages, split_points)
    pp_mesh = mesh["pp"]
    stage_modules = {}
    for stage_index in stage_ids_for_rank(pp_mesh.get_local_rank(), parallel_dims.pp, num_stages,
                                          v_shape=parallelism.pipeline_parallel_schedule == "ZBVZeroBubble"):
        stage = split_stage(model, layer_ranges[stage_index], is_first=stage_index == 0,
                            is_last=stage_index == num_stages - 1)
        stage_modules[stage_index] = parallelize_llama(stage, parallel_dims, mesh, job_config)
    n_microbatches = job_config.training.local_batch_size // parallelism.pipeline_parallel_microbatch_size
    return build_pipeline(stage_modules, num_stages, parallelism.pipeline_parallel_schedule, n_microbatches,
                          grad_accum_steps, loss_fn, pp_mesh, device)
