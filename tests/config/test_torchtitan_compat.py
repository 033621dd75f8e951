"""A TorchTitan 0.2 llama3 TOML loads with only its dataset lines changed (docs/config.md lists why)."""

from torchtitan_like.config import load_config

TORCHTITAN_DEBUG_TOML = """
[job]
dump_folder = "./outputs"
description = "Llama 3 debug training"
print_config = false

[profiling]
enable_profiling = false
save_traces_folder = "profile_trace"
profile_freq = 10
enable_memory_snapshot = false
save_memory_snapshot_folder = "memory_snapshot"

[metrics]
log_freq = 1
disable_color_printing = false
enable_tensorboard = false
save_tb_folder = "tb"
enable_wandb = false

[model]
name = "llama3"
flavor = "debugmodel"
hf_assets_path = "./tests/assets/tokenizer"

[optimizer]
name = "AdamW"
lr = 8e-4
eps = 1e-8

[lr_scheduler]
warmup_steps = 2
decay_ratio = 0.8
decay_type = "linear"
min_lr_factor = 0.0

[training]
local_batch_size = 8
seq_len = 2048
max_norm = 1.0
steps = 10
dataset = "local"                        # TorchTitan: dataset = "c4_test"
dataset_path = "./tests/assets/c4_test"  # (the folder of TorchTitan's c4_test)

[parallelism]
data_parallel_replicate_degree = 1
data_parallel_shard_degree = -1
fsdp_reshard_after_forward = "default"
tensor_parallel_degree = 1
enable_async_tensor_parallel = false
pipeline_parallel_degree = 1
context_parallel_degree = 1

[checkpoint]
enable = false
folder = "checkpoint"
interval = 10
last_save_model_only = false
export_dtype = "float32"
async_mode = "disabled"

[activation_checkpoint]
mode = "selective"
selective_ac_option = "2"

[compile]
enable = false
components = ["model", "loss"]

[quantize.linear.float8]
enable_fsdp_float8_all_gather = false
precompute_float8_dynamic_scale_for_fsdp = false
filter_fqns = ["output"]

[validation]
enable = false
dataset = "local"                         # TorchTitan: dataset = "c4_validation"
freq = 5
steps = 10

[experimental]
custom_import = ""
"""


def test_torchtitan_debug_toml_loads_with_its_values(tmp_path):
    path = tmp_path / "torchtitan_debug_model.toml"
    path.write_text(TORCHTITAN_DEBUG_TOML)
    config, _ = load_config(["--config", str(path)])
    assert config.model.flavor == "debugmodel" and config.model.hf_assets_path == "./tests/assets/tokenizer"
    assert config.lr_scheduler.decay_ratio == 0.8 and config.lr_scheduler.decay_type == "linear"
    assert config.activation_checkpoint.mode == "selective" and config.activation_checkpoint.selective_ac_option == "2"
    assert config.float8.filter_fqns == ["output"] and config.parallelism.fsdp_reshard_after_forward == "default"
    assert config.checkpoint.last_save_model_only is False and config.training.seq_len == 2048
