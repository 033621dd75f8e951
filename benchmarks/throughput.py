"""Training throughput of a named config: tokens/s per device, MFU and peak memory.

    python benchmarks/throughput.py --config train_configs/llama3_8b_8layers_bench.toml \
        [--steps 30] [--warmup 10] [--json out.json] [--profile-steps 3] [--section.key value ...]

Builds the real `Trainer` from the config (plus overrides), runs `--warmup` untimed steps (compile,
allocator warm-up), then times the remaining optimizer steps as one window (device synchronized at
its two ends only, losses read back after it, as in a real run where the host runs ahead of the
GPU). Prints a one-row markdown table. Run it on one process, or under torchrun for a
multi-GPU plan (numbers are per device; rank 0 prints). `--profile-steps N` then records N more
steps under `torch.profiler` and prints where their kernel time went (`profile_step.py`'s tables),
without compiling the model a second time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=30, help="total optimizer steps (warmup included)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before measuring")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--label", default="torchtitan_like")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="after the timed window, profile this many more steps (0: none)")
    parser.add_argument("--profile-top", type=int, default=15, help="kernels listed by total time in the profile")
    args, overrides = parser.parse_known_args(argv)
    if not 0 <= args.warmup < args.steps:  # else no step is timed and tokens/s divides ~0 s by one step
        parser.error(f"--warmup {args.warmup} must be at least 0 and less than --steps {args.steps} "
                     f"(the steps timed are steps - warmup)")

    from torchtitan_like.config import load_config
    from torchtitan_like.logging import init_logger
    from torchtitan_like.trainer import Trainer

    init_logger()
    total_steps = args.steps + max(args.profile_steps, 0)
    config, _ = load_config(["--config", args.config, "--training.steps", str(total_steps), *overrides])
    trainer = Trainer(config)
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    iterator = iter(trainer.dataloader)
    tokens_per_step = trainer.tokens_per_device_step
    losses = []
    for step in range(1, args.warmup + 1):
        losses.append(trainer.train_step(iterator)[0])
        trainer.step = step
    sync()
    # As the trainer's loop (and TorchTitan's) runs: no garbage collection inside the timed steps,
    # and the peak memory of these steps, not of compilation and autotuning during warm-up.
    gc.collect()
    gc.disable()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(args.warmup + 1, args.steps + 1):
        losses.append(trainer.train_step(iterator)[0])
        trainer.step = step
    sync()
    gc.enable()
    timed_steps = args.steps - args.warmup
    step_seconds = (time.perf_counter() - start) / max(timed_steps, 1)
    losses = [loss.item() for loss in losses]
    tokens_per_second = tokens_per_step / step_seconds
    flops = trainer.model_args.flops_per_token(config.training.seq_len)
    peak = trainer.metrics.peak_flops
    mfu = 100.0 * tokens_per_second * flops / peak if peak else None
    memory_gib = torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None
    result = {"label": args.label, "config": args.config, "overrides": overrides, "device": _device_name(device),
              "torch": torch.__version__, "tokens_per_second": tokens_per_second, "mfu_pct": mfu,
              "peak_memory_gib": memory_gib, "mean_step_s": step_seconds, "timed_steps": timed_steps,
              "first_loss": losses[0], "last_loss": losses[-1]}
    if trainer.rank == 0:
        print("| label | device | tokens/s/device | MFU % | peak mem GiB | mean step s | loss first->last |")
        print("|---|---|---|---|---|---|---|")
        mfu_text = f"{mfu:.1f}" if mfu is not None else "n/a"
        memory_text = f"{memory_gib:.1f}" if memory_gib is not None else "n/a"
        print(f"| {args.label} | {result['device']} | {tokens_per_second:,.0f} | {mfu_text} | {memory_text} | "
              f"{step_seconds:.4f} | {losses[0]:.3f}->{losses[-1]:.3f} |")
    if args.profile_steps > 0:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import profile_step

        result["profile"], _ = profile_step.profile_steps(trainer, iterator, args.steps + 1, args.profile_steps,
                                                          args.profile_top)
        if trainer.rank == 0:
            print()
            profile_step.print_tables(result["profile"], f"{args.label}, kernel time by kind")
    if trainer.rank == 0 and args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    trainer.close()
    return 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


if __name__ == "__main__":
    sys.exit(main())
