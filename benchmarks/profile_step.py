"""Where the time of one training step goes: device kernels grouped by kind, per step.

    python benchmarks/profile_step.py --config train_configs/llama3_8b_8layers_bench.toml \
        [--warmup 6] [--steps 3] [--top 15] [--json out.json] [--trace trace.json] [--section.key value ...]

Builds the real `Trainer`, runs `--warmup` untimed steps (compile, allocator), then records
`--steps` steps under `torch.profiler` and prints two markdown tables: milliseconds per step for
each kind of kernel (matmul, attention, optimizer, norm, fp8 casts, loss, other fused elementwise,
collectives, copies) with its share of the profiled kernel time, and the `--top` kernels by total
time with their launches per step. On CUDA the rows are GPU kernels; on CPU (smoke tests) they are
the CPU ops at the bottom of the call tree (self time). Kernel time is not step time: gaps where
the device waits for the host show up as the difference between the two, printed as "idle".
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# First match wins; names are lower-cased kernel (or op) names.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach", "lerp", "addcdiv", "addcmul")),
    ("rmsnorm", ("rms_norm", "rmsnorm")),
    ("fp8 cast", ("_block_amax", "_scale_cast", "_rowwise_kernel", "amax")),
    # before matmul and copy/fill: Inductor names its cross-entropy kernels after every op they
    # fuse, `_to_copy` (the fp32 upcast) included
    ("loss", ("log_softmax", "nll_loss", "cross_entropy")),
    ("matmul", ("gemm", "xmma", "cutlass", "nvjet", "matmul", "triton_tem_", "aten::mm", "addmm", "bmm",
                "scaled_mm", "wgmma")),
    ("collective", ("nccl", "gloo", "allreduce", "all_gather", "reduce_scatter")),
    ("copy/fill", ("memcpy", "memset", "copy_", "fill_", "zero_", "cat", "contiguous")),
    ("fused elementwise", ("triton_", "fused_", "elementwise", "vectorized", "reduce_kernel")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def _is_annotation(event) -> bool:
    """A user-annotated range, not a kernel: `record_function` ranges (e.g. `Optimizer.step#AdamW.step`,
    `ProfilerStep#7`) also appear on the GPU timeline, spanning the kernels they contain; counting
    them would count those kernels twice (the first H200 profile did: 29 ms of "optimizer" twice)."""
    return bool(getattr(event, "is_user_annotation", False)) or event.key.startswith(("ProfilerStep#", "Optimizer."))


def _kernel_events(profiler, on_cuda: bool):
    """(name, microseconds, calls) of each kernel (CUDA) or leaf op (CPU self time) with time."""
    for event in profiler.key_averages():
        if _is_annotation(event):
            continue
        if on_cuda:
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            micros = event.self_device_time_total
        else:
            micros = event.self_cpu_time_total
            if event.key.startswith("ProfilerStep"):
                continue
        if micros > 0:
            yield event.key, micros, getattr(event, "count", 0)


def kernel_times_us(profiler, on_cuda: bool) -> dict[str, float]:
    """Kernel (CUDA) or leaf-op (CPU self time) name -> total microseconds over the profiled steps."""
    totals: dict[str, float] = {}
    for name, micros, _ in _kernel_events(profiler, on_cuda):
        totals[name] = totals.get(name, 0.0) + micros
    return totals


def kernel_calls(profiler, on_cuda: bool) -> dict[str, int]:
    """Kernel (or leaf-op) name -> launches over the profiled steps: how many casts, say, a step
    makes (docs/benchmarks.md compares the fp8 cast kernels' count per step)."""
    calls: dict[str, int] = {}
    for name, _, count in _kernel_events(profiler, on_cuda):
        calls[name] = calls.get(name, 0) + count
    return calls


def summarize(totals_us: dict[str, float], steps: int, step_ms: float, top: int,
              calls: dict[str, int] | None = None) -> dict:
    by_kind: dict[str, float] = {}
    for name, micros in totals_us.items():
        kind = kind_of(name)
        by_kind[kind] = by_kind.get(kind, 0.0) + micros
    kernel_ms = sum(totals_us.values()) / 1000.0 / steps
    kinds = sorted(((kind, micros / 1000.0 / steps) for kind, micros in by_kind.items()), key=lambda item: -item[1])
    top_kernels = sorted(totals_us.items(), key=lambda item: -item[1])[:top]
    return {"step_ms": step_ms, "kernel_ms": kernel_ms, "idle_ms": max(step_ms - kernel_ms, 0.0),
            "kinds": [{"kind": kind, "ms_per_step": ms, "pct_of_kernel_time": 100.0 * ms / kernel_ms if kernel_ms else 0.0}
                      for kind, ms in kinds],
            "top": [{"name": name, "kind": kind_of(name), "ms_per_step": micros / 1000.0 / steps,
                     "calls_per_step": (calls or {}).get(name, 0) / steps}
                    for name, micros in top_kernels]}


def print_tables(summary: dict, label: str) -> None:
    print(f"{label}: step {summary['step_ms']:.2f} ms, kernels {summary['kernel_ms']:.2f} ms, "
          f"idle {summary['idle_ms']:.2f} ms (per step)")
    print("| kind | ms/step | % of kernel time |")
    print("|---|---:|---:|")
    for row in summary["kinds"]:
        print(f"| {row['kind']} | {row['ms_per_step']:.2f} | {row['pct_of_kernel_time']:.1f} |")
    print()
    print("| kernel | kind | ms/step | calls/step |")
    print("|---|---|---:|---:|")
    for row in summary["top"]:
        name = row["name"] if len(row["name"]) <= 90 else row["name"][:87] + "..."
        print(f"| `{name.replace('|', '/')}` | {row['kind']} | {row['ms_per_step']:.2f} | "
              f"{row.get('calls_per_step', 0):g} |")


def profile_steps(trainer, iterator, first_step: int, steps: int, top: int):
    """Run `steps` optimizer steps of `trainer` (numbered from `first_step`) under torch.profiler;
    returns (`summarize` of them, the profiler). The caller has warmed the trainer up."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as profiler:
        start = time.perf_counter()
        for step in range(first_step, first_step + steps):
            trainer.train_step(iterator)
            trainer.step = step
        sync()
        step_ms = (time.perf_counter() - start) * 1000.0 / steps
    summary = summarize(kernel_times_us(profiler, on_cuda), steps, step_ms, top, kernel_calls(profiler, on_cuda))
    summary["profiled_steps"] = steps
    return summary, profiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps before profiling")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=15, help="kernels listed by total time")
    parser.add_argument("--json", default="", help="write the summary here")
    parser.add_argument("--trace", default="", help="also write a Chrome trace here")
    parser.add_argument("--label", default="torchtitan_like")
    args, overrides = parser.parse_known_args(argv)

    from torchtitan_like.config import load_config
    from torchtitan_like.logging import init_logger
    from torchtitan_like.trainer import Trainer

    init_logger()
    total_steps = args.warmup + args.steps
    config, _ = load_config(["--config", args.config, "--training.steps", str(total_steps), *overrides])
    trainer = Trainer(config)
    on_cuda = trainer.device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    iterator = iter(trainer.dataloader)
    for step in range(1, args.warmup + 1):
        trainer.train_step(iterator)
        trainer.step = step
    sync()
    summary, profiler = profile_steps(trainer, iterator, args.warmup + 1, args.steps, args.top)
    summary.update(label=args.label, device=torch.cuda.get_device_name(trainer.device) if on_cuda else "cpu",
                   torch=torch.__version__, overrides=overrides, profiled_steps=args.steps)
    if trainer.rank == 0:
        print_tables(summary, args.label)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump(summary, handle, indent=1)
        if args.trace:
            profiler.export_chrome_trace(args.trace)
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
