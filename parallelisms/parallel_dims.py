"""Parallel degrees, their validation, and the one DeviceMesh every parallelism is built on.

Mesh dims, outermost first: `pp`, `dp_replicate`, `dp_shard`, `tp`. Only degrees > 1 appear, except
that `dp_shard` stays (even at size 1) whenever `dp_replicate` > 1, because HSDP needs the 2-D
(replicate, shard) mesh. The flattened `dp` dim (dp_replicate x dp_shard) drives data loading and
loss averaging. All checks run before any collective and raise
`ConfigError`, so every rank exits with code 2 and the same message instead of hanging.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchtitan_like.errors import ConfigError


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    world_size: int

    @classmethod
    def from_config(cls, parallelism, world_size: int) -> "ParallelDims":
        """Resolve -1 (inferred dp_shard) and check that the degrees multiply to the world size."""
        dp_replicate = parallelism.data_parallel_replicate_degree
        tp, pp = parallelism.tensor_parallel_degree, parallelism.pipeline_parallel_degree
        dp_shard = parallelism.data_parallel_shard_degree
        others = dp_replicate * tp * pp
        if dp_shard == -1:
            if world_size % others != 0:
                raise ConfigError(
                    f"parallelism: world size {world_size} is not divisible by data_parallel_replicate_degree "
                    f"({dp_replicate}) x tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) = {others}, "
                    f"so data_parallel_shard_degree = -1 cannot be inferred; the product of the degrees must equal the "
                    f"number of processes")
            dp_shard = world_size // others
        if dp_shard < 1:
            raise ConfigError(f"parallelism.data_parallel_shard_degree = {dp_shard}: must be -1 or >= 1")
        if dp_replicate * dp_shard * tp * pp != world_size:
            raise ConfigError(
                f"parallelism: data_parallel_replicate_degree ({dp_replicate}) x data_parallel_shard_degree "
                f"({dp_shard}) x tensor_parallel_degree ({tp}) x pipeline_parallel_degree ({pp}) = "
                f"{dp_replicate * dp_shard * tp * pp}, but the world size is {world_size}; the product must equal "
                f"the number of processes")
        return cls(dp_replicate=dp_replicate, dp_shard=dp_shard, tp=tp, pp=pp, world_size=world_size)

    # ------------------------------------------------------------------ properties
    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether parameters are wrapped by FSDP2 (sharded, or replicated with HSDP)."""
        return self.dp > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def non_data_parallel_size(self) -> int:
        return self.tp * self.pp

    def mesh_shape(self) -> list[tuple[str, int]]:
        dims = [("pp", self.pp), ("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard), ("tp", self.tp)]
        return [(name, size) for name, size in dims if size > 1 or (name == "dp_shard" and self.hsdp_enabled)]

    def build_mesh(self, device_type: str):
        """The world's DeviceMesh with named dims and the flattened `dp` dim; None for one process."""
        from torch.distributed.device_mesh import init_device_mesh

        dims = self.mesh_shape()
        if not dims:
            return None
        names = tuple(name for name, _ in dims)
        mesh = init_device_mesh(device_type, tuple(size for _, size in dims), mesh_dim_names=names)
        dp_names = tuple(name for name in ("dp_replicate", "dp_shard") if name in names)
        if len(dp_names) > 1:
            mesh[dp_names]._flatten(mesh_dim_name="dp")
        return mesh

    def validate_model(self, model_args, training, parallelism, validation=None) -> None:
        """Checks that need the model's shape: divisibility by TP, layers over PP stages, batches."""
        if self.tp > 1:
            for name, value in (("n_heads", model_args.n_heads), ("n_kv_heads", model_args.kv_heads),
                                ("ffn hidden dim", model_args.ffn_hidden_dim), ("dim", model_args.dim),
                                ("vocab_size", model_args.vocab_size)):
                if value % self.tp != 0:
                    padded = -(-value // self.tp) * self.tp
                    remedy = (f"choose a degree that divides it, or pad the vocabulary: model.vocab_size = {padded}"
                              if name == "vocab_size" else "choose a degree that divides it")
                    raise ConfigError(f"parallelism.tensor_parallel_degree = {self.tp} does not divide the model's "
                                      f"{name} ({value}); {remedy}")
            if training.seq_len % self.tp != 0:
                raise ConfigError(f"training.seq_len = {training.seq_len} must be divisible by "
                                  f"parallelism.tensor_parallel_degree = {self.tp} (sequence parallel)")
            if validation is not None and validation.enable and validation.seq_len not in (-1, training.seq_len) \
                    and validation.seq_len % self.tp != 0:
                raise ConfigError(f"validation.seq_len = {validation.seq_len} must be divisible by "
                                  f"parallelism.tensor_parallel_degree = {self.tp} (sequence parallel)")
        if self.pp > 1:
            if getattr(model_args, "tie_word_embeddings", False):
                raise ConfigError("this model flavor ties the LM head to the embedding (tie_word_embeddings), which "
                                  "live on the first and the last pipeline stage; set "
                                  "parallelism.pipeline_parallel_degree = 1")
            self._validate_pipeline(model_args, training, parallelism)
            n_microbatches = training.local_batch_size // parallelism.pipeline_parallel_microbatch_size
            if validation is not None and validation.enable and parallelism.pipeline_parallel_schedule == "ZBVZeroBubble":
                # torch's V-schedule runtime performs a backward-side transfer even in eval().
                raise ConfigError("validation.enable = true does not work with parallelism.pipeline_parallel_schedule "
                                  "= \"ZBVZeroBubble\" (its forward-only pass fails in torch); use another schedule "
                                  "or validation.enable = false")
            if validation is not None and validation.enable and validation.local_batch_size % n_microbatches != 0:
                raise ConfigError(f"validation.local_batch_size = {validation.local_batch_size} must be divisible by "
                                  f"the {n_microbatches} pipeline microbatches (training.local_batch_size / "
                                  f"pipeline_parallel_microbatch_size) when pipeline_parallel_degree > 1")

    def pipeline_num_stages(self, n_layers: int, parallelism) -> int:
        """Total pipeline stages: from split points, from layers per stage, or one per rank
        (two per rank for multi-stage schedules)."""
        if parallelism.pipeline_parallel_split_points:
            return len(parallelism.pipeline_parallel_split_points) + 1
        if parallelism.pipeline_parallel_layers_per_stage > 0:
            return n_layers // parallelism.pipeline_parallel_layers_per_stage
        return self.pp * (2 if parallelism.pipeline_parallel_schedule in MULTI_STAGE_SCHEDULES else 1)

    def _validate_pipeline(self, model_args, training, parallelism) -> None:
        schedule = parallelism.pipeline_parallel_schedule
        layers_per_stage = parallelism.pipeline_parallel_layers_per_stage
        if parallelism.pipeline_parallel_split_points and layers_per_stage > 0:
            raise ConfigError("parallelism.pipeline_parallel_split_points and pipeline_parallel_layers_per_stage "
                              "both set; give one of them")
        if layers_per_stage > 0 and model_args.n_layers % layers_per_stage != 0:
            raise ConfigError(f"parallelism.pipeline_parallel_layers_per_stage = {layers_per_stage} does not divide "
                              f"the model's n_layers ({model_args.n_layers})")
        for point in parallelism.pipeline_parallel_split_points:
            index = point.split(".")[1] if point.startswith("layers.") and point.count(".") == 1 else ""
            if not index.isdigit() or not 0 < int(index) < model_args.n_layers:
                raise ConfigError(f"parallelism.pipeline_parallel_split_points contains {point!r}; each point must be "
                                  f"'layers.N' with 0 < N < n_layers ({model_args.n_layers}), in increasing order")
        indices = [int(point.split(".")[1]) for point in parallelism.pipeline_parallel_split_points]
        if indices != sorted(set(indices)):
            raise ConfigError(f"parallelism.pipeline_parallel_split_points {parallelism.pipeline_parallel_split_points} "
                              f"must be distinct and in increasing order")
        stages = self.pipeline_num_stages(model_args.n_layers, parallelism)
        if stages % self.pp != 0:
            raise ConfigError(f"{stages} pipeline stages cannot be spread evenly over pipeline_parallel_degree = "
                              f"{self.pp} ranks")
        stages_per_rank = stages // self.pp
        if schedule in MULTI_STAGE_SCHEDULES and stages_per_rank < 2:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} needs at least 2 stages per rank, "
                              f"but the split gives {stages} stages for {self.pp} ranks; use GPipe or 1F1B, or more stages")
        if schedule not in MULTI_STAGE_SCHEDULES and stages_per_rank != 1:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} runs one stage per rank, but the "
                              f"split gives {stages} stages for {self.pp} ranks; use Interleaved1F1B or change the split")
        if schedule == "ZBVZeroBubble" and stages_per_rank != 2:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = 'ZBVZeroBubble' needs exactly 2 stages per rank "
                              f"(V shape), got {stages_per_rank}")
        if model_args.n_layers < stages:
            raise ConfigError(f"the model's {model_args.n_layers} layers cannot be split over {stages} pipeline "
                              f"stages (pipeline_parallel_degree = {self.pp}, schedule {schedule})")
        microbatch = parallelism.pipeline_parallel_microbatch_size
        if training.local_batch_size % microbatch != 0:
            raise ConfigError(f"training.local_batch_size = {training.local_batch_size} is not divisible by "
                              f"parallelism.pipeline_parallel_microbatch_size = {microbatch}")
        n_microbatches = training.local_batch_size // microbatch
        if n_microbatches < self.pp:
            raise ConfigError(f"training.local_batch_size / pipeline_parallel_microbatch_size = {n_microbatches} "
                              f"microbatches is fewer than pipeline_parallel_degree = {self.pp}; the pipeline would "
                              f"idle (raise local_batch_size or lower the microbatch size)")
        if schedule in MULTI_STAGE_SCHEDULES and n_microbatches % self.pp != 0:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} needs the number of microbatches "
                              f"({n_microbatches}) to be a multiple of pipeline_parallel_degree = {self.pp}")

    def validate_features(self, parallelism, compile_config, device_type: str, cpu_offload: bool = False,
                          master_weights: str = "float32", activation_checkpoint=None,
                          sdpa_backends: tuple[str, ...] = ()) -> None:
        """Checks that need the device or the resolved degrees: async TP runs only on CUDA with
        torch.compile; FSDP CPU offload moves sharded state between a GPU and host memory, so it needs
        both; split master weights are for one process (FSDP's mixed precision covers sharded runs);
        zero-bubble schedules split each backward in two, which compiled code, per-op AC and FSDP's
        resharding after forward do not support; on CPU, compiled TP blocks that AC recomputes whole
        need the math attention kernel (`sdpa_backends`, as resolved; empty: PyTorch's choice)."""
        if self.pp_enabled and parallelism.pipeline_parallel_schedule in ZERO_BUBBLE_SCHEDULES:
            self._validate_split_backward(parallelism, compile_config, activation_checkpoint)
        if device_type == "cpu" and self.tp_enabled:
            self._validate_recomputed_compiled_tp_blocks(compile_config, activation_checkpoint, sdpa_backends)
        if master_weights == "split" and self.world_size > 1:
            degrees = [f"{name} {value}" for name, value in (("dp_replicate", self.dp_replicate), ("dp_shard", self.dp_shard),
                                                             ("tp", self.tp), ("pp", self.pp)) if value > 1]
            raise ConfigError(f"training.master_weights = 'split' is for one process without FSDP, tensor or pipeline "
                              f"parallel; this run has {self.world_size} ({', '.join(degrees)}). FSDP's mixed-precision "
                              f"policy keeps fp32 shards and computes in bf16 already: use master_weights = 'float32'")
        if cpu_offload:
            if device_type != "cuda":
                raise ConfigError("training.enable_cpu_offload = true keeps FSDP parameters, gradients and optimizer "
                                  f"state in host memory for a GPU run; this run is on {device_type}: set it to false")
            if not self.fsdp_enabled:
                raise ConfigError("training.enable_cpu_offload = true offloads FSDP-sharded state and needs a data-"
                                  "parallel degree > 1 (data_parallel_shard_degree or data_parallel_replicate_degree)")
        if parallelism.enable_async_tensor_parallel:
            if device_type != "cuda":
                raise ConfigError("parallelism.enable_async_tensor_parallel = true needs CUDA (symmetric memory); "
                                  f"this run is on {device_type}: set it to false")
            if not self.tp_enabled:
                raise ConfigError("parallelism.enable_async_tensor_parallel = true needs tensor_parallel_degree > 1")
            if not (compile_config.enable and "model" in compile_config.components):
                raise ConfigError("parallelism.enable_async_tensor_parallel = true needs compile.enable = true with "
                                  "'model' in compile.components (the micro-pipelining is an Inductor pass)")

    @staticmethod
    def _validate_recomputed_compiled_tp_blocks(compile_config, activation_checkpoint, sdpa_backends) -> None:
        """A compiled TP block saves its DeviceMesh for backward (an opaque graph value, placed after
        the saved tensors). When AC recomputes the whole block, the CPU flash attention kernel counts
        as a random op (dropout), and AOTAutograd saves the CPU RNG state for its recomputation as one
        more forward output, inserted after that mesh: torch 2.13 then reads the mesh as a saved tensor
        and the first forward fails ("expected all tensors_saved_with_vc_check to be Tensors"), with
        aot_eager and Inductor alike. The math kernel is no random op; per-op AC saves the attention
        output instead of recomputing it. On CUDA torch takes its graph-safe RNG path instead, which
        adds no such output (not checked here: the tests have no GPU)."""
        if not (compile_config.enable and "model" in compile_config.components) or activation_checkpoint is None:
            return
        recomputes_blocks = activation_checkpoint.mode == "full" or (
            activation_checkpoint.mode == "selective" and activation_checkpoint.selective_ac_option != "op")
        if recomputes_blocks and tuple(sdpa_backends) != ("math",):
            raise ConfigError(f"activation_checkpoint.mode = {activation_checkpoint.mode!r} (whole blocks recomputed) "
                              f"with compile.enable = true and tensor_parallel_degree > 1 fails in torch on CPU with "
                              f"the flash attention kernel (its RNG state is saved out of order); set "
                              f"model.sdpa_backend = \"math\", or activation_checkpoint.selective_ac_option = \"op\" "
                              f"with mode \"selective\", or compile.enable = false")

    def _validate_split_backward(self, parallelism, compile_config, activation_checkpoint) -> None:
        """A zero-bubble schedule computes each microbatch's input gradients first (autograd.grad with
        retain_graph) and its weight gradients later, walking the same graph a second time. A compiled
        block or loss donates its saved buffers to its one backward node, which refuses a retained
        graph, and per-op AC allows one backward per region: either fails at the first step (torch
        refuses compiled stage modules itself, but only those wrapped in OptimizedModule, not blocks
        compiled in place by parallelisms/compile.py). FSDP units that reshard after forward are
        worse, silently: the input pass collects the stage's parameters before FSDP's pre-backward
        hook gathers them again, so it gets the sharded ones, which are not in the graph, and the
        weight pass computes no gradient for them (after a step the last stage's gradients are None
        and the middle stages' lack microbatches) while the run trains on."""
        schedule = parallelism.pipeline_parallel_schedule
        if compile_config.enable and compile_config.components:
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} splits each backward into an "
                              f"input and a weight pass, which torch.compile'd code does not support; set "
                              f"compile.enable = false or use 1F1B, GPipe, Interleaved1F1B or LoopedBFS")
        if (activation_checkpoint is not None and activation_checkpoint.mode == "selective"
                and activation_checkpoint.selective_ac_option == "op"):
            raise ConfigError(f"parallelism.pipeline_parallel_schedule = {schedule!r} splits each backward into an "
                              f"input and a weight pass, and per-op activation checkpointing (activation_checkpoint."
                              f"selective_ac_option = 'op') allows one backward per block; use mode 'full' or an "
                              f"integer selective_ac_option, or another schedule")
        if self.fsdp_enabled and parallelism.fsdp_reshard_after_forward == "always":
            raise ConfigError(f"parallelism.fsdp_reshard_after_forward = 'always' with pipeline_parallel_schedule = "
                              f"{schedule!r} silently loses weight gradients (its input-gradient pass looks the "
                              f"parameters up while FSDP holds them resharded after forward); use 'default' or "
                              f"'never', or another schedule")


# Schedules that run several (virtual) stages on each rank.
MULTI_STAGE_SCHEDULES = ("Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble")
# Schedules that split each microbatch's backward into an input-gradient and a weight-gradient pass.
ZERO_BUBBLE_SCHEDULES = ("InterleavedZeroBubble", "ZBVZeroBubble")
