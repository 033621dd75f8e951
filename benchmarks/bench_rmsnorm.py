"""RMSNorm bandwidth: the Triton kernels against PyTorch eager, F.rms_norm and torch.compile.

    python benchmarks/bench_rmsnorm.py            # 4 shapes of 64 Mi bf16 elements, hidden 2048..16384
    python benchmarks/bench_rmsnorm.py --quick    # 2 shapes
    python benchmarks/bench_rmsnorm.py --json out.json --sweep   # also time ours at neighbouring launch configs

GB/s counts the minimal bytes any implementation must move, the same for every variant:
forward reads x and w and writes y and rstd; backward reads x, dy, w and rstd and writes dx and dw.
"% of copy" compares with a large device-to-device copy (read + write bytes).

Timing: each measurement captures CALLS back-to-back calls in a CUDA graph and replays it, so Python,
dispatcher and launch overheads (custom op, autograd) stay out of the numbers and only GPU time is
counted; the median over replays is reported, per call. Every call moves >= 256 MiB, several times
the 50-60 MB L2, so no cache flushing is needed. If a capture fails, the same calls run back to
back on a stream instead (marked "loop"). fwd: training-mode forward (inputs require grad);
bwd: `torch.autograd.grad(y, (x, w), dy, retain_graph=True)` on a saved graph; fwd+bwd: both.
The sweep times ours at kernel level (`_forward` / `_backward`) under `launch_overrides`, checking
each config's outputs against the default's. Without CUDA the script prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

EPS = 1e-6
DEVICE = "cuda"
SHAPES = [(32768, 2048), (16384, 4096), (8192, 8192), (4096, 16384)]
QUICK_SHAPES = [(16384, 4096), (4096, 16384)]
CALLS, REPLAYS = 8, 10

# Neighbours of each default launch (rmsnorm_launch.py), as overrides. Backward defaults:
# 2048 (block_m 2, 8 warps, 3 stages, 2/SM), 4096 (1, 8, 3, 2/SM), 8192 (1, 16, 3, 1/SM),
# 16384 (1, 16, 2, 1/SM). Forward defaults: 2048 (2 rows, 8 warps), 4096+ (1 row, 8/16/16 warps).
SWEEP_BACKWARD = {
    2048: [dict(bwd_stages=2), dict(bwd_stages=1, bwd_programs_per_sm=3), dict(bwd_block_m=1, bwd_warps=4),
           dict(bwd_block_m=4, bwd_stages=2, bwd_programs_per_sm=1), dict(bwd_programs_per_sm=3)],
    4096: [dict(bwd_stages=2), dict(bwd_stages=1, bwd_programs_per_sm=3), dict(bwd_warps=16),
           dict(bwd_programs_per_sm=1), dict(bwd_programs_per_sm=3)],
    8192: [dict(bwd_stages=2), dict(bwd_stages=1, bwd_programs_per_sm=2), dict(bwd_warps=32),
           dict(bwd_programs_per_sm=2)],
    16384: [dict(bwd_stages=1), dict(bwd_stages=3), dict(bwd_warps=32), dict(bwd_warps=32, bwd_stages=1)],
}
SWEEP_FORWARD = {
    2048: [dict(fwd_block_m=1, fwd_warps=4), dict(fwd_block_m=4, fwd_warps=8)],
    4096: [dict(fwd_warps=4), dict(fwd_block_m=2, fwd_warps=8)],
    8192: [dict(fwd_warps=8), dict(fwd_warps=32)],
    16384: [dict(fwd_warps=8), dict(fwd_warps=32)],
}


def gpu_ms(setup) -> tuple[float, float, str]:
    """(median ms per call, (p80 - p20) / median, method) of the function `setup()` returns.

    setup runs on a side stream (so autograd's backward, which follows the forward's stream, is
    captured too), the function is warmed up twice (compilation, allocator) before capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = setup()
        for _ in range(2):
            fn()
        stream.synchronize()
        graph, method = torch.cuda.CUDAGraph(), "graph"
        try:
            with torch.cuda.graph(graph, stream=stream):
                for _ in range(CALLS):
                    fn()
            run = graph.replay
        except Exception:  # a baseline that cannot be captured is still timed, with launch gaps
            torch.cuda.synchronize()
            graph, method = None, "loop"

            def run():
                for _ in range(CALLS):
                    fn()
        run()
        times = []
        for _ in range(REPLAYS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            run()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end) / CALLS)
    del graph
    times.sort()
    median = statistics.median(times)
    spread = (times[int(0.8 * (len(times) - 1))] - times[int(0.2 * (len(times) - 1))]) / median
    return median, spread, method


def copy_bandwidth_gbs() -> float:
    """Timed as plain launches, not a CUDA graph: a device-to-device copy captured in a graph
    becomes a memcpy node that may run on the copy engines, which read 2,759 GB/s on an H200
    (2026-11-27) against 4,180 for the same copy launched normally (an SM kernel)."""
    src = torch.randn(256 * 2**20, device=DEVICE, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / CALLS)
    ms = statistics.median(times)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def eager_formula(x, weight):
    x_fp32 = x.float()
    return (x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()).to(x.dtype)


def variants(use_compile: bool):
    from torchtitan_like.kernels.rmsnorm import rms_norm

    found = {
        "triton (ours)": lambda x, w: rms_norm(x, w, EPS),
        "torch eager": eager_formula,
        "F.rms_norm": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
    }
    if use_compile:
        # The bwd-only timing calls autograd.grad(retain_graph=True), which a compiled backward
        # with donated buffers refuses: keep its buffers (no effect on the kernels it generates).
        import torch._functorch.config as functorch_config

        if hasattr(functorch_config, "donated_buffer"):
            functorch_config.donated_buffer = False
        found["torch.compile"] = torch.compile(eager_formula, dynamic=False)
    return found


def minimal_bytes(rows: int, hidden: int, element_size: int) -> tuple[int, int]:
    """(forward, backward) bytes."""
    tensor, vector, rstd = rows * hidden * element_size, hidden * element_size, rows * 4
    return 2 * tensor + vector + rstd, 3 * tensor + 2 * vector + rstd


def check_correctness(shape) -> dict:
    """Ours vs the fp32 reference on the GPU: relative max error of y, dx, dw and the fused add."""
    from torchtitan_like.kernels.rmsnorm import fused_add_rms_norm, rms_norm, rms_norm_reference

    rows, hidden = shape
    x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.3 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    y = rms_norm(x, w, EPS)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y32 = rms_norm_reference(x32, w32, EPS)
    dx32, dw32 = torch.autograd.grad(y32, (x32, w32), dy.float())

    def rel(a, b):
        return ((a.float() - b).abs().max() / b.abs().max()).item()

    # Fused add, both outputs used: exercises the backward's dsummed input.
    residual, dsummed = torch.randn_like(x), torch.randn_like(x)
    normed, summed = fused_add_rms_norm(x, residual, w, EPS)
    dx_fused, dw_fused = torch.autograd.grad((normed, summed), (x, w), (dy, dsummed))
    summed32 = summed.detach().float().requires_grad_()
    w32_fused = w.detach().float().requires_grad_()
    normed32 = rms_norm_reference(summed32, w32_fused, EPS)
    dsummed32, dw32_fused = torch.autograd.grad(normed32, (summed32, w32_fused), dy.float())
    errors = {"y": rel(y, y32), "dx": rel(dx, dx32), "dw": rel(dw, dw32), "fused_normed": rel(normed, normed32),
              "fused_dx": rel(dx_fused, dsummed32 + dsummed.float()), "fused_dw": rel(dw_fused, dw32_fused),
              "fused_summed_exact": bool(torch.equal(summed, x.detach() + residual))}
    errors["ok"] = all(v < 2e-2 for k, v in errors.items() if k != "fused_summed_exact") and errors["fused_summed_exact"]
    return errors


def bench_shape(shape, fns, copy_gbs) -> list[dict]:
    rows, hidden = shape
    x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    fwd_bytes, bwd_bytes = minimal_bytes(rows, hidden, x.element_size())
    results = []
    for name, fn in fns.items():
        row = {"rows": rows, "hidden": hidden, "variant": name}
        try:
            def setup_backward(fn=fn):
                y = fn(x, w)
                return lambda: torch.autograd.grad(y, (x, w), dy, retain_graph=True)

            measured = {
                "fwd": gpu_ms(lambda fn=fn: (lambda: fn(x, w))),
                "fwd_bwd": gpu_ms(lambda fn=fn: (lambda: torch.autograd.grad(fn(x, w), (x, w), dy))),
                "bwd": gpu_ms(setup_backward),
            }
            for key, nbytes in (("fwd", fwd_bytes), ("bwd", bwd_bytes), ("fwd_bwd", fwd_bytes + bwd_bytes)):
                ms, spread, method = measured[key]
                row[f"{key}_ms"], row[f"{key}_spread"], row[f"{key}_method"] = ms, spread, method
                row[f"{key}_gbs"] = nbytes / (ms * 1e-3) / 1e9
                row[f"{key}_pct_copy"] = 100 * row[f"{key}_gbs"] / copy_gbs
            torch.cuda.synchronize()  # host time to enqueue one eager fwd+bwd (is a training step launch-bound?)
            start = time.perf_counter()
            for _ in range(5):
                torch.autograd.grad(fn(x, w), (x, w), dy)
            row["host_us_per_fwd_bwd"] = (time.perf_counter() - start) / 5 * 1e6
            torch.cuda.synchronize()
        except Exception as error:  # one failing baseline must not lose the rest of the table
            row["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        results.append(row)
    return results


def describe(overrides: dict) -> str:
    return " ".join(f"{k.split('_', 1)[1]}={v}" for k, v in overrides.items()) or "default"


def sweep_shape(shape, copy_gbs) -> list[dict]:
    """Ours at the default and neighbouring launch configs, forward and backward separately."""
    from torchtitan_like.kernels import rmsnorm
    from torchtitan_like.kernels.rmsnorm_launch import backward_launch, forward_launch, launch_overrides

    rows, hidden = shape
    x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16)
    dy = torch.randn_like(x)
    fwd_bytes, bwd_bytes = minimal_bytes(rows, hidden, x.element_size())
    y_ref, _, rstd = rmsnorm._forward(x, None, w, EPS)
    dx_ref, dw_ref = rmsnorm._backward(dy, x, w, rstd, None)
    jobs = [("fwd", {})] + [("fwd", o) for o in SWEEP_FORWARD.get(hidden, [])]
    jobs += [("bwd", {})] + [("bwd", o) for o in SWEEP_BACKWARD.get(hidden, [])] + [("bwd", {})]  # default twice: noise
    results = []
    for direction, overrides in jobs:
        row = {"rows": rows, "hidden": hidden, "pass": direction, "config": describe(overrides)}
        try:
            with launch_overrides(**overrides):
                launch = forward_launch(hidden) if direction == "fwd" else backward_launch(hidden)
                if direction == "fwd":
                    y = rmsnorm._forward(x, None, w, EPS)[0]
                    row["ok"] = bool((y.float() - y_ref.float()).abs().max().item() <= 1e-2 * y_ref.float().abs().max().item())
                    ms, spread, method = gpu_ms(lambda: (lambda: rmsnorm._forward(x, None, w, EPS)))
                else:
                    dx, dw = rmsnorm._backward(dy, x, w, rstd, None)
                    dw_error = ((dw.float() - dw_ref.float()).abs().max() / dw_ref.float().abs().max()).item()
                    row["ok"] = bool((dx.float() - dx_ref.float()).abs().max().item() <= 1e-2 * dx_ref.float().abs().max().item()
                                     and dw_error < 1e-2)
                    ms, spread, method = gpu_ms(lambda: (lambda: rmsnorm._backward(dy, x, w, rstd, None)))
            gbs = (fwd_bytes if direction == "fwd" else bwd_bytes) / (ms * 1e-3) / 1e9
            row.update(launch=vars(launch), ms=ms, spread=spread, method=method, gbs=gbs, pct_copy=100 * gbs / copy_gbs)
        except Exception as error:
            row["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        results.append(row)
    return results


def compiled_kernel_resources() -> list[str]:
    """Registers / spills / shared memory of every compiled variant of our kernels (best effort)."""
    from torchtitan_like.kernels import rmsnorm

    lines = []
    for jit_fn in (rmsnorm._rms_norm_fwd_kernel, rmsnorm._rms_norm_bwd_kernel, rmsnorm._sum_partials_kernel):
        try:
            for caches in getattr(jit_fn, "device_caches", {}).values():
                for kernel in caches[0].values():
                    meta = kernel.metadata
                    constants = getattr(getattr(kernel, "src", None), "constants", {}) or {}
                    lines.append(f"{getattr(kernel, 'name', '?')}: warps={meta.num_warps} stages={meta.num_stages} "
                                 f"regs={getattr(kernel, 'n_regs', '?')} spills={getattr(kernel, 'n_spills', '?')} "
                                 f"shared={meta.shared} constexprs={list(constants.values())}")
        except Exception as error:
            lines.append(f"{getattr(jit_fn, '__name__', jit_fn)}: resources unavailable ({type(error).__name__}: {error})")
    return lines


def print_table(results: list[dict]) -> None:
    print("| rows x hidden | variant | fwd GB/s | bwd GB/s | fwd+bwd GB/s | fwd % copy | bwd % copy | fwd+bwd % copy "
          "| fwd+bwd ms | host us/step |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in results:
        size = f"{row['rows']}x{row['hidden']}"
        if "error" in row:
            print(f"| {size} | {row['variant']} | error: {row['error']} | | | | | | | |")
            continue
        loop = " (loop)" if "loop" in (row["fwd_method"], row["bwd_method"], row["fwd_bwd_method"]) else ""
        print(f"| {size} | {row['variant']}{loop} | {row['fwd_gbs']:.0f} | {row['bwd_gbs']:.0f} | {row['fwd_bwd_gbs']:.0f} | "
              f"{row['fwd_pct_copy']:.1f} | {row['bwd_pct_copy']:.1f} | {row['fwd_bwd_pct_copy']:.1f} | "
              f"{row['fwd_bwd_ms']:.3f} | {row['host_us_per_fwd_bwd']:.0f} |")


def print_sweep(sweep: list[dict]) -> None:
    print("| rows x hidden | pass | config (overrides of the default) | GB/s | % copy | spread | outputs ok |")
    print("|---|---|---|---:|---:|---:|---|")
    for row in sweep:
        size = f"{row['rows']}x{row['hidden']}"
        if "error" in row:
            print(f"| {size} | {row['pass']} | {row['config']} | error: {row['error']} | | | |")
            continue
        method = " (loop)" if row["method"] == "loop" else ""
        print(f"| {size} | {row['pass']} | {row['config']}{method} | {row['gbs']:.0f} | {row['pct_copy']:.1f} | "
              f"{100 * row['spread']:.1f}% | {row['ok']} |")
    print("\nbest per size (set as overrides in TORCHTITAN_RMSNORM_LAUNCH, or adopt in rmsnorm_launch.py):")
    for key in sorted({(r["hidden"], r["pass"]) for r in sweep}):
        candidates = [r for r in sweep if (r["hidden"], r["pass"]) == key and "gbs" in r and r["ok"]]
        if candidates:
            best = max(candidates, key=lambda r: r["gbs"])
            print(f"  hidden {key[0]} {key[1]}: {best['config']} -> {best['gbs']:.0f} GB/s, launch {best['launch']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes instead of four")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--sweep", action="store_true", help="also time ours at neighbouring launch configs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA not available, skipping the RMSNorm benchmark")
        return 0
    from torchtitan_like.kernels import rmsnorm
    from torchtitan_like.kernels.rmsnorm_launch import backward_grid, backward_launch, forward_launch

    began = time.perf_counter()
    shapes = QUICK_SHAPES if args.quick else SHAPES
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}; torch {torch.__version__}; triton {__import__('triton').__version__}")
    copy_gbs = copy_bandwidth_gbs()
    print(f"device copy bandwidth (read + write): {copy_gbs:.0f} GB/s")

    correctness = {f"{r}x{h}": check_correctness((r, h)) for r, h in shapes + [(37, 1000)]}
    for size, errors in correctness.items():
        print(f"correctness {size}: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in errors.items()))

    fns = variants(not args.no_compile)
    results, sweep = [], []
    for shape in shapes:
        forward, backward = forward_launch(shape[1]), backward_launch(shape[1])
        programs, rows_per_program = backward_grid(shape[0], backward, rmsnorm._sm_count(torch.device(DEVICE)))
        print(f"ours at {shape[0]}x{shape[1]}: forward {forward}; backward {backward}, {programs} programs x "
              f"{rows_per_program} rows ({time.perf_counter() - began:.0f}s)", flush=True)
        results += bench_shape(shape, fns, copy_gbs)
    if args.sweep:
        for shape in shapes:
            print(f"sweep {shape[0]}x{shape[1]} ({time.perf_counter() - began:.0f}s)", flush=True)
            sweep += sweep_shape(shape, copy_gbs)
    resources = compiled_kernel_resources()
    print("\ncompiled kernels (this GPU's Triton):")
    for line in resources:
        print("  " + line)
    if sweep:
        print("\nsweep of ours (kernel-level, CUDA-graph timed):")
        print_sweep(sweep)
    print(f"\nmain table (CUDA-graph timed, {CALLS} calls x {REPLAYS} replays, median; total {time.perf_counter() - began:.0f}s):")
    print_table(results)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "copy_gbs": copy_gbs, "correctness": correctness,
                       "results": results, "sweep": sweep, "kernels": resources}, handle, indent=2)
    return 0 if all(errors["ok"] for errors in correctness.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
