"""The benchmark scripts run where CI runs: throughput and the step profile on the debug model print
their tables and JSON; the GPU-only kernel benchmarks exit cleanly without CUDA."""

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.helpers import REPO_ROOT, free_port


def run_script(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})


def run_on_debug_model(script, tmp_path, json_path, *args):
    """`script` on the debug model: tiny sequences, no validation or TensorBoard, output under tmp_path."""
    return run_script(script, "--config", "train_configs/debug_model.toml", *args, "--json", str(json_path),
                      "--training.seq_len", "32", "--lr_scheduler.warmup_steps", "1", "--validation.enable", "false",
                      "--job.dump_folder", str(tmp_path / "run"), "--metrics.enable_tensorboard", "false")


GPU_BENCHMARKS = ["benchmarks/bench_rmsnorm.py", "benchmarks/bench_float8.py", "benchmarks/bench_optimizer.py"]
FLOAT8_FSDP_CHECKS = {"compile": ["--compile"], "bfloat16": ["--param-dtype", "bfloat16"]}


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """{name: (output folder, future of the CompletedProcess)} of every script run of this module,
    started together two at a time: each is one process (OMP_NUM_THREADS=1) and CI has two cores.
    Each test checks its own run."""
    runs = {  # name: the run, given its output folder (called in the worker: an error fails its own test)
        "throughput": lambda folder: run_on_debug_model(
            "benchmarks/throughput.py", folder, folder / "throughput.json", "--steps", "4", "--warmup", "2",
            "--profile-steps", "1"),
        "profile_step": lambda folder: run_on_debug_model(
            "benchmarks/profile_step.py", folder, folder / "profile.json", "--warmup", "1", "--steps", "1"),
        "attention": lambda folder: run_script(
            "benchmarks/bench_attention.py", "--reps", "2", "--json", str(folder / "attention.json"), timeout=120),
        **{script: lambda folder, script=script: run_script(script, "--quick", timeout=120)
           for script in GPU_BENCHMARKS},
        # each its own port (the script's default, 29517, would be taken by the other check)
        **{f"float8_fsdp_{name}": lambda folder, extra=extra: run_script(
            "benchmarks/check_float8_fsdp.py", "--dim", "64", "--hidden", "128", "--tokens", "32", *extra, timeout=300,
            env={"MASTER_PORT": str(free_port())}) for name, extra in FLOAT8_FSDP_CHECKS.items()},
    }
    with ThreadPoolExecutor(2) as pool:
        started = {}
        for name, run in runs.items():
            folder = tmp_path_factory.mktemp(name.replace("/", "_"))
            started[name] = (folder, pool.submit(run, folder))
        yield started


def test_throughput_benchmark_trains_the_debug_model_and_reports(script_runs):
    folder, future = script_runs["throughput"]
    out = folder / "throughput.json"
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| torchtitan_like | cpu |" in result.stdout
    record = json.loads(out.read_text())
    assert record["timed_steps"] == 2 and record["tokens_per_second"] > 0 and record["mfu_pct"] is None
    assert record["last_loss"] < record["first_loss"]
    # --profile-steps: one more step profiled in the same process, its CPU ops grouped by kind
    profile = record["profile"]
    assert profile["profiled_steps"] == 1 and profile["kernel_ms"] > 0
    assert "matmul" in {row["kind"] for row in profile["kinds"]}
    assert "torchtitan_like, kernel time by kind" in result.stdout


@pytest.mark.parametrize("script", GPU_BENCHMARKS)
def test_gpu_benchmarks_exit_cleanly_without_cuda(script_runs, script):
    result = script_runs[script][1].result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CUDA" in result.stdout + result.stderr


def test_profile_step_groups_the_debug_model_step_by_kind(script_runs):
    folder, future = script_runs["profile_step"]
    out = folder / "profile.json"
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| kind | ms/step | % of kernel time |" in result.stdout
    summary = json.loads(out.read_text())
    kinds = {row["kind"]: row["ms_per_step"] for row in summary["kinds"]}
    # The step's matmuls, attention and AdamW are each found, and the kinds add up to the total.
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and kinds["optimizer"] > 0
    assert abs(sum(kinds.values()) - summary["kernel_ms"]) < 1e-6 * max(summary["kernel_ms"], 1.0)


@pytest.mark.parametrize("name,kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas", "matmul"),
    ("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<128>>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_128x128x128", "attention"),
    ("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4, ADAM_MODE(1), false>>", "optimizer"),
    ("_rms_norm_bwd_kernel", "rmsnorm"),
    ("_block_amax_kernel", "fp8 cast"),
    ("ncclDevKernel_AllGather_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "collective"),
    ("Memcpy DtoD (Device -> Device)", "copy/fill"),
    ("triton_poi_fused_add_mul_silu_0", "fused elementwise"),
    ("triton_red_fused__log_softmax__to_copy_prepare_softmax_online_view_0", "loss"),
    ("triton_red_fused__log_softmax__log_softmax_backward_data__to_copy_arange_eq_expand_nll_loss", "loss"),
])
def test_profile_step_kinds_of_gpu_kernel_names(name, kind):
    sys.path.insert(0, f"{REPO_ROOT}/benchmarks")
    try:
        import profile_step
    finally:
        sys.path.remove(f"{REPO_ROOT}/benchmarks")
    assert profile_step.kind_of(name) == kind


def test_profile_step_leaves_out_annotated_ranges_that_would_count_kernels_twice():
    # On the GPU timeline `Optimizer.step#AdamW.step` spans the AdamW kernel: counted as a kernel,
    # the optimizer's time was doubled in the first H200 profile.
    sys.path.insert(0, f"{REPO_ROOT}/benchmarks")
    try:
        import profile_step
    finally:
        sys.path.remove(f"{REPO_ROOT}/benchmarks")
    from torch.autograd import DeviceType
    from types import SimpleNamespace

    def event(key, micros, annotation=False):
        return SimpleNamespace(key=key, device_type=DeviceType.CUDA, self_device_time_total=micros,
                               is_user_annotation=annotation)

    events = [event("Optimizer.step#AdamW.step", 29.0), event("ProfilerStep#7", 240.0),
              event("my_range", 5.0, annotation=True),
              event("void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 28.9),
              event("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", 40.6)]
    profiler = SimpleNamespace(key_averages=lambda: events)
    totals = profile_step.kernel_times_us(profiler, on_cuda=True)
    assert totals == {"void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor>": 28.9,
                      "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": 40.6}


def test_profile_step_counts_each_kernel_s_launches_per_step(capsys):
    # docs/benchmarks.md reads the fp8 cast kernels' launches per step from the profile (4 activation
    # casts per block instead of 7): the top-kernel table must carry that count, not only the time.
    sys.path.insert(0, f"{REPO_ROOT}/benchmarks")
    try:
        import profile_step
    finally:
        sys.path.remove(f"{REPO_ROOT}/benchmarks")
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    events = [SimpleNamespace(key="_scale_cast_kernel", device_type=DeviceType.CUDA, self_device_time_total=990.0,
                              count=432, is_user_annotation=False),
              SimpleNamespace(key="Optimizer.step#AdamW.step", device_type=DeviceType.CUDA,
                              self_device_time_total=29.0, count=3, is_user_annotation=False)]
    profiler = SimpleNamespace(key_averages=lambda: events)
    assert profile_step.kernel_calls(profiler, on_cuda=True) == {"_scale_cast_kernel": 432}
    summary = profile_step.summarize(profile_step.kernel_times_us(profiler, on_cuda=True), 3, 1.0, 10,
                                     profile_step.kernel_calls(profiler, on_cuda=True))
    assert summary["top"] == [{"name": "_scale_cast_kernel", "kind": "fp8 cast", "ms_per_step": 0.33,
                               "calls_per_step": 144.0}]
    profile_step.print_tables(summary, "fp8")
    assert "| `_scale_cast_kernel` | fp8 cast | 0.33 | 144 |" in capsys.readouterr().out


def test_attention_benchmark_checks_each_cpu_kernel_against_the_fp32_reference(script_runs):
    folder, future = script_runs["attention"]
    out = folder / "attention.json"
    result = future.result()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| kernel | fwd ms | fwd+bwd ms |" in result.stdout
    rows = {row["backend"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"flash", "flash gqa", "math", "math gqa"}
    # fp32 on CPU: the flash kernel agrees with the reference to rounding; the math kernel is it.
    assert all(row["ok"] and max(row["errors"].values()) < 1e-5 for row in rows.values())
    assert max(rows["flash"]["errors"].values()) > 0  # another kernel: the comparison sees its rounding
    assert rows["flash"]["total_ms"] > 0


@pytest.mark.parametrize("check", list(FLOAT8_FSDP_CHECKS))
def test_float8_fsdp_device_check_passes_on_one_cpu_process(script_runs, check):
    # bfloat16: the GPU's mixed-precision path, where the fp8 all-gather must cast the bf16 values
    result = script_runs[f"float8_fsdp_{check}"][1].result()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "y=True, dx=True, dW1=True, dW2=True | True |" in result.stdout


def gpu_suite_training_sections() -> dict[str, list[str]]:
    """{section name: its config overrides} of every training run in benchmarks/gpu_suite.sh, read
    from the script (continuation lines joined; the benchmark's own flags and the attention fallback
    variable left out)."""
    import shlex

    with open(os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.sh")) as handle:
        text = handle.read().replace("\\\n", " ")
    own_flags = {"--label": 1, "--json": 1, "--profile-steps": 1, "--profile-top": 1}
    sections = {}
    for line in text.splitlines():
        if not line.startswith("section "):
            continue
        words = shlex.split(line, comments=True)
        if len(words) < 4 or words[0] != "section" or words[3] != "${BENCH[@]}":
            continue
        overrides, rest = [], words[4:]
        while rest:
            word = rest.pop(0)
            if word in own_flags:
                del rest[:own_flags[word]]
            elif "ATTENTION" not in word:
                overrides.append(word)
        sections[words[1]] = overrides
    return sections


def test_every_gpu_suite_training_run_passes_the_start_up_checks_of_the_benchmark_config():
    # The benchmark config once pinned optimizer.implementation = "fused": the suite's split-master-
    # weights runs would have stopped at their config check on the GPU, after the lease had started.
    from torchtitan_like.config import load_config, validate_config
    from torchtitan_like.data import build_tokenizer
    from torchtitan_like.optim.optimizers import resolve_implementation
    from torchtitan_like.parallelisms.parallel_dims import ParallelDims
    from torchtitan_like.startup import resolve_model_args

    sections = gpu_suite_training_sections()
    assert {"train_bf16", "train_fp8", "train_bf16_split", "train_fp8_split", "train_bf16_fused_adamw"} <= set(sections)
    for name, overrides in sections.items():
        config, _ = load_config(["--config", os.path.join(REPO_ROOT, "train_configs", "llama3_8b_8layers_bench.toml"),
                                 *overrides])
        _, model_args = resolve_model_args(config, build_tokenizer(config.model))
        validate_config(config, model_args)  # raises ConfigError naming the key
        dims = ParallelDims.from_config(config.parallelism, world_size=1)
        dims.validate_features(config.parallelism, config.compile, "cuda", master_weights=config.training.master_weights)
        wanted = "fused" if name == "train_bf16_fused_adamw" else "triton"
        assert resolve_implementation(config.optimizer.implementation, "cuda") in (wanted, "fused"), name
        if name != "train_bf16_fused_adamw":  # the headline runs use our Triton AdamW step on CUDA
            assert config.optimizer.implementation in ("auto", "triton"), (name, config.optimizer.implementation)
        assert (config.training.master_weights == "split") == ("split" in name), name
        assert config.float8.enable == ("fp8" in name), name


def _throughput_module():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(REPO_ROOT, "benchmarks", "throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("steps,warmup", [(10, 10), (5, 10), (4, -1)])
def test_throughput_refuses_a_warmup_that_leaves_no_timed_step(steps, warmup, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _throughput_module().main(["--config", "train_configs/debug_model.toml", "--steps", str(steps),
                                   "--warmup", str(warmup)])
    assert exit_info.value.code == 2
    assert "--warmup" in capsys.readouterr().err
