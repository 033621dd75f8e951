"""The plan dry-run: shipped configs at their intended scale on CPU, an oversized plan, the formulas."""

from __future__ import annotations

import os

import pytest

from tests.helpers import REPO_ROOT, run_cli
from torchtitan_like import plan
from torchtitan_like.plan_memory import BlockShape, block_activation_bytes_per_token, in_flight_microbatches


def _config(name: str) -> str:
    return os.path.join(REPO_ROOT, "train_configs", name)


def _plan(capsys, *argv: str) -> tuple[int, str]:
    code = plan.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


SHIPPED = [("debug_model.toml", 1, []), ("llama3_1b.toml", 8, []), ("llama3_3b.toml", 8, []),
           ("llama3_8b.toml", 8, []), ("llama3_8b_8layers_bench.toml", 1, []), ("llama3_70b.toml", 64, []),
           ("llama3_70b_256gpu.toml", 256, []), ("llama3_405b.toml", 512, [])]


def test_every_shipped_config_is_planned():
    # A config added to train_configs/ without a row above would never be loaded or validated by CI.
    shipped = sorted(name for name in os.listdir(os.path.join(REPO_ROOT, "train_configs")) if name.endswith(".toml"))
    assert sorted(name for name, _, _ in SHIPPED) == shipped


@pytest.mark.parametrize("config_name,ngpu,overrides", SHIPPED)
def test_shipped_config_fits_at_its_intended_scale(capsys, config_name, ngpu, overrides):
    code, out = _plan(capsys, "--config", _config(config_name), "--ngpu", str(ngpu), *overrides)
    assert code == 0, out
    assert f"on {ngpu} GPUs" in out and "fits" in out
    assert "on this rank after sharding" in out and "FLOPs per token" in out


def test_fsdp_shards_parameters_evenly_over_ranks(capsys):
    code, out = _plan(capsys, "--config", _config("llama3_8b.toml"), "--ngpu", "8", "--rank", "3")
    assert code == 0, out
    counts = out.split("parameters: ")[1].split(";")
    total = int(counts[0].split()[0].replace(",", ""))
    local = int(counts[2].split()[0].replace(",", ""))
    assert abs(local * 8 - total) / total < 0.01  # FSDP pads dim 0 only slightly


def test_last_pipeline_rank_runs_the_output_stage(capsys):
    code, out = _plan(capsys, "--config", _config("llama3_405b.toml"), "--ngpu", "512", "--rank", "511",
                      "--gpu-memory-gib", "141")
    assert code == 0, out
    assert "layers 119-125 + norm/output" in out and "output logits" in out and "H200" in out


def test_oversized_plan_does_not_fit_and_names_the_knobs(capsys):
    code, out = _plan(capsys, "--config", _config("llama3_405b.toml"), "--ngpu", "8",
                      "--parallelism.pipeline_parallel_degree", "1")
    assert code == plan.DOES_NOT_FIT_EXIT_CODE == 3, out
    assert "DOES NOT FIT" in out and "warning:" in out and "FSDP" in out


def test_config_mistake_exits_2_before_building():
    result = run_cli(["--config", _config("llama3_70b.toml"), "--ngpu", "12"], module="torchtitan_like.plan")
    assert result.returncode == 2, result.stderr
    assert "error:" in result.stderr and "world size 12" in result.stderr


@pytest.mark.parametrize("option,value", [("--gpu-memory-gib", "nan"), ("--gpu-memory-gib", "0"), ("--rank", "8")])
def test_bad_plan_option_exits_2_naming_it(capsys, option, value):
    assert plan.main(["--config", _config("llama3_8b.toml"), "--ngpu", "8", option, value]) == 2
    err = capsys.readouterr().err
    assert f"error: {option} " in err and ": must be" in err, err


def test_activation_formula_matches_the_documented_counts():
    shape = BlockShape(dim=4096, kv_dim=1024, ffn_hidden_dim=14336, vocab_size=128256)
    h, kv, ffn = 4096, 1024, 14336
    assert block_activation_bytes_per_token(shape, 1, "none") == 22 * h + 4 * kv + 8 * ffn
    assert block_activation_bytes_per_token(shape, 8, "full") == 2 * h / 8
    selective = block_activation_bytes_per_token(shape, 1, "op")
    assert block_activation_bytes_per_token(shape, 1, "full") < selective < block_activation_bytes_per_token(
        shape, 1, "none")


def test_pipeline_schedules_hold_the_documented_microbatches():
    assert in_flight_microbatches("1F1B", 1, 8, 1) == 1
    assert in_flight_microbatches("1F1B", 4, 16, 1) == 4
    assert in_flight_microbatches("GPipe", 4, 16, 1) == 16
    assert in_flight_microbatches("Interleaved1F1B", 8, 8, 2) == 8  # capped by the microbatches
    assert in_flight_microbatches("Interleaved1F1B", 4, 16, 2) == pytest.approx(4 * (1 + 3 / 8))


def test_looped_bfs_holds_every_microbatch_like_gpipe():
    # torch's ScheduleLoopedBFS runs all forwards of every local stage before the first backward.
    assert in_flight_microbatches("LoopedBFS", 4, 16, 2) == 16
    assert in_flight_microbatches("LoopedBFS", 2, 4, 3) == 4


@pytest.mark.parametrize("schedule", ["InterleavedZeroBubble", "ZBVZeroBubble"])
def test_zero_bubble_schedules_hold_pp_microbatches_like_1f1b(schedule):
    # Peaks of torch's action orders: rank 0 warms up with v * pp - 1 stage-microbatches, then each
    # forward is matched by a weight-gradient step (Interleaved1F1B's warm-up is longer: 5.5 here).
    assert in_flight_microbatches(schedule, 4, 16, 2) == 4
    assert in_flight_microbatches(schedule, 8, 24, 2) == 8


def _rank_layout(config_name: str, ngpu: int, rank: int, *overrides: str):
    """The plan's RankLayout of one rank, built as `plan.plan` builds it."""
    import torch.distributed as dist

    from torchtitan_like.config import load_config
    from torchtitan_like.models import get_model_spec
    from torchtitan_like.parallelisms.parallel_dims import ParallelDims

    config, _ = load_config(["--config", _config(config_name), *overrides])
    spec = get_model_spec(config.model.name)
    model_args = spec.args_for(config.model.flavor)
    plan.resolve_vocab(config, model_args)
    parallel_dims = ParallelDims.from_config(config.parallelism, ngpu)
    try:
        parts = plan.build_rank(config, parallel_dims, rank, spec, model_args)
        return config, model_args, plan.rank_layout(parts, parallel_dims, config)
    finally:
        dist.destroy_process_group()


def test_selective_ac_counts_the_every_kth_layers_this_ranks_stage_holds():
    # Every 3rd layer by global id is layer 2: the second of two 2-layer stages holds it although
    # 2 // 3 = 0, and its estimate must include that block's recomputation.
    from torchtitan_like.plan_memory import activation_bytes

    ac = ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "3",
          "--parallelism.pipeline_parallel_degree", "2"]
    _, _, first = _rank_layout("debug_model.toml", 2, 0, *ac)
    config, args, second = _rank_layout("debug_model.toml", 2, 1, *ac)
    assert (first.blocks_on_rank, first.checkpointed_blocks) == (2, 0)
    assert (second.blocks_on_rank, second.checkpointed_blocks) == (2, 1)
    shape = BlockShape(dim=args.dim, kv_dim=args.kv_heads * args.head_dim, ffn_hidden_dim=args.ffn_hidden_dim,
                       vocab_size=args.vocab_size)
    tokens, in_flight = config.training.seq_len, 2.0  # microbatches of 1 sample; 1F1B over 2 ranks
    blocks, _ = activation_bytes(shape, second, "selective", "3", tokens, in_flight)
    full, none = (block_activation_bytes_per_token(shape, 1, mode) for mode in ("full", "none"))
    assert blocks == ((full + none) * in_flight + none) * tokens


def test_vocab_smaller_than_the_tokenizers_exits_2_as_the_trainer_does(capsys):
    # The byte tokenizer needs no files, so the plan can check the size against it as the trainer does.
    code, output = _plan(capsys, "--config", _config("debug_model.toml"), "--ngpu", "1", "--model.vocab_size", "100")
    assert code == 2, output
    assert "model.vocab_size = 100 is smaller than the tokenizer's vocabulary (258)" in output


def test_cpu_offload_without_data_parallel_exits_2():
    # One GPU has no FSDP-sharded state to offload: the flag would silently do nothing.
    result = run_cli(["--config", _config("llama3_8b_8layers_bench.toml"), "--ngpu", "1",
                      "--training.enable_cpu_offload", "true"], module="torchtitan_like.plan")
    assert result.returncode == 2, result.stderr
    assert "training.enable_cpu_offload = true offloads FSDP-sharded state" in result.stderr


def test_split_master_weights_on_several_gpus_exits_2(capsys):
    # The dry run makes the trainer's start-up checks: split master weights are for one process.
    code, output = _plan(capsys, "--config", _config("debug_model.toml"), "--ngpu", "2",
                         "--training.master_weights", "split")
    assert code == 2, output
    assert "master_weights = 'split' is for one process" in output


def _estimate(layout_overrides=None, attn_mask_type="causal", **config_overrides):
    from dataclasses import replace

    from torchtitan_like.config.job_config import ActivationCheckpoint, Parallelism, Training
    from torchtitan_like.plan_memory import RankLayout, estimate_memory

    shape = BlockShape(dim=4096, kv_dim=1024, ffn_hidden_dim=14336, vocab_size=128256)
    layout = RankLayout(local_params=10**9, unit_params=[100, 200, 300], head_unit_params=300, blocks_on_rank=2,
                        checkpointed_blocks=0, has_output=True, stages_on_rank=1, tp=4, pp=1, fsdp=True,
                        reshard_after_forward=True)
    layout = replace(layout, **(layout_overrides or {}))
    training = Training(seq_len=1024, local_batch_size=4, **config_overrides.pop("training", {}))
    parallelism = Parallelism(**config_overrides.pop("parallelism", {}))
    return estimate_memory(shape, layout, training, parallelism, ActivationCheckpoint(mode="none"),
                           attn_mask_type).components


def _component(components, prefix):
    return next(value for name, value in components.items() if name.startswith(prefix))


def test_fsdp_under_pipeline_holds_every_units_unsharded_gradient():
    # torch's pipeline stage syncs FSDP gradients only at the last microbatch's backward
    one_microbatch = _estimate()
    pipelined = _estimate({"pp": 2}, parallelism={"pipeline_parallel_microbatch_size": 1})
    assert _component(one_microbatch, "FSDP unsharded gradient (one unit)") == 300 * 4
    assert _component(pipelined, "FSDP unsharded gradients (every unit") == (100 + 200 + 300) * 4


def test_fp32_compute_doubles_activations_and_drops_the_logits_upcast():
    bf16, fp32 = _estimate(), _estimate(training={"mixed_precision_param": "float32"})
    assert _component(fp32, "activations") == 2 * _component(bf16, "activations")
    tokens, vocab, tp = 4 * 1024, 128256, 4
    head_input = 4 * 4096 / tp * tokens  # the final norm's input, in bf16
    assert _component(bf16, "output logits") == head_input + (2 + 4 + 4) * vocab / tp * tokens
    assert _component(fp32, "output logits") == 2 * head_input + (4 + 4) * vocab / tp * tokens


def test_a_block_causal_mask_adds_one_seq_by_seq_mask_per_microbatch_in_flight():
    causal, block_causal = _estimate(), _estimate(attn_mask_type="block_causal")
    assert not any(name.startswith("block-causal") for name in causal)
    assert _component(block_causal, "block-causal attention mask") == 4 * 1024 * 1024 * 2  # batch x seq^2, bf16
    pipelined = _estimate({"pp": 2}, attn_mask_type="block_causal",
                          parallelism={"pipeline_parallel_microbatch_size": 1})
    assert _component(pipelined, "block-causal attention mask") == 2 * 1 * 1024 * 1024 * 2  # 1F1B: 2 in flight


def test_without_loss_parallel_every_tp_rank_holds_the_whole_logits():
    split = _component(_estimate(), "output logits")
    whole = _component(_estimate(parallelism={"disable_loss_parallel": True}), "output logits")
    head_input = 4 * 4096 / 4 * 4 * 1024
    assert whole - head_input == pytest.approx(4 * (split - head_input))


def test_split_master_weights_keep_4_bytes_of_master_and_bf16_gradients():
    one_gpu = {"tp": 1, "fsdp": False}
    plain = _estimate(one_gpu)
    split = _estimate(one_gpu, training={"master_weights": "split"})
    accumulating = _estimate(one_gpu, training={"master_weights": "split", "global_batch_size": 8})
    assert _component(split, "parameters (split master") == _component(plain, "parameters (fp32") == 4 * 10**9
    assert _component(split, "gradients (bf16)") == 2 * 10**9 and _component(plain, "gradients (fp32)") == 4 * 10**9
    assert not any(name.startswith("gradient accumulation") for name in split)
    assert _component(accumulating, "gradient accumulation (fp32 main_grad)") == 4 * 10**9
