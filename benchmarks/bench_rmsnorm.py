"""RMSNorm bandwidth: the Triton kernels against PyTorch eager, F.rms_norm and torch.compile.

    python benchmarks/bench_rmsnorm.py            # 4 shapes of 64 Mi bf16 elements, hidden 2048..16384
    python benchmarks/bench_rmsnorm.py --quick    # 2 shapes
    python benchmarks/bench_rmsnorm.py --json out.json --sweep   # also try other num_warps / grids

GB/s counts the minimal bytes any implementation must move, the same for every variant:
forward reads x and w and writes y and rstd; backward reads x, dy, w and rstd and writes dx and dw.
"% of copy" compares with a large device-to-device copy (read + write bytes). The forward is timed in
training mode (inputs require grad), as it runs in a training step. Without CUDA the script prints a
message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F

EPS = 1e-6
DEVICE = "cuda"
SHAPES = [(32768, 2048), (16384, 4096), (8192, 8192), (4096, 16384)]
QUICK_SHAPES = [(16384, 4096), (4096, 16384)]


def median_ms(fn, warmup_ms: int = 10, rep_ms: int = 40) -> float:
    """Median time of fn in ms; `quantiles` works on every Triton 2.x / 3.x `do_bench`."""
    from triton.testing import do_bench

    result = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5])
    return float(result[0] if isinstance(result, (list, tuple)) else result)


def copy_bandwidth_gbs() -> float:
    src = torch.randn(256 * 2**20, device=DEVICE, dtype=torch.bfloat16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
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
        found["torch.compile"] = torch.compile(eager_formula, dynamic=False)
    return found


def minimal_bytes(rows: int, hidden: int, element_size: int) -> tuple[int, int]:
    tensor, vector, rstd = rows * hidden * element_size, hidden * element_size, rows * 4
    forward = 2 * tensor + vector + rstd
    backward = 3 * tensor + 2 * vector + rstd
    return forward, forward + backward


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

    residual = torch.randn_like(x)
    normed, summed = fused_add_rms_norm(x.detach(), residual, w.detach(), EPS)
    fused_ref = rms_norm_reference(summed.float(), w32.detach(), EPS)
    errors = {"y": rel(y, y32), "dx": rel(dx, dx32), "dw": rel(dw, dw32), "fused_normed": rel(normed, fused_ref),
              "fused_summed_exact": bool(torch.equal(summed, x.detach() + residual))}
    errors["ok"] = all(errors[k] < 2e-2 for k in ("y", "dx", "dw", "fused_normed")) and errors["fused_summed_exact"]
    return errors


def bench_shape(shape, fns, copy_gbs) -> list[dict]:
    rows, hidden = shape
    x = torch.randn(rows, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(torch.bfloat16).requires_grad_()
    dy = torch.randn_like(x)
    fwd_bytes, fwd_bwd_bytes = minimal_bytes(rows, hidden, x.element_size())
    results = []
    for name, fn in fns.items():
        row = {"rows": rows, "hidden": hidden, "variant": name}
        try:
            forward_ms = median_ms(lambda: fn(x, w))
            fwd_bwd_ms = median_ms(lambda: torch.autograd.grad(fn(x, w), (x, w), dy))
            row.update(fwd_ms=forward_ms, fwd_bwd_ms=fwd_bwd_ms,
                       fwd_gbs=fwd_bytes / (forward_ms * 1e-3) / 1e9,
                       fwd_bwd_gbs=fwd_bwd_bytes / (fwd_bwd_ms * 1e-3) / 1e9)
            row["fwd_pct_copy"] = 100 * row["fwd_gbs"] / copy_gbs
            row["fwd_bwd_pct_copy"] = 100 * row["fwd_bwd_gbs"] / copy_gbs
        except Exception as error:  # one failing baseline must not lose the rest of the table
            row["error"] = " ".join(f"{type(error).__name__}: {error}".split())[:200]
        results.append(row)
    return results


def sweep_shape(shape, copy_gbs) -> list[dict]:
    """Ours at other num_warps and backward grids (fwd+bwd GB/s), to tune the launch heuristics."""
    from torchtitan_like.kernels import rmsnorm

    default_config, default_programs = rmsnorm._launch_config, rmsnorm._backward_programs
    block_m, block_n, default_warps = default_config(shape[1])
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    configs = [(warps, None) for warps in (4, 8, 16, 32) if warps != default_warps]
    configs += [(default_warps, per_sm) for per_sm in (1, 2, 4, 8, 16)]
    results = []
    for warps, per_sm in configs:
        rmsnorm._launch_config = lambda n, warps=warps: default_config(n)[:2] + (warps,)
        if per_sm is not None:
            rmsnorm._backward_programs = lambda n_blocks, bn, dev, per_sm=per_sm: min(n_blocks, sm_count * per_sm)
        try:
            row = bench_shape(shape, {"ours": variants(False)["triton (ours)"]}, copy_gbs)[0]
        finally:
            rmsnorm._launch_config, rmsnorm._backward_programs = default_config, default_programs
        row.update(variant=f"ours warps={warps} bwd_programs/SM={per_sm or 'default'}", block_m=block_m)
        results.append(row)
    return results


def print_table(results: list[dict]) -> None:
    print("| rows x hidden | variant | fwd GB/s | fwd+bwd GB/s | fwd % of copy | fwd+bwd % of copy |")
    print("|---|---|---:|---:|---:|---:|")
    for row in results:
        size = f"{row['rows']}x{row['hidden']}"
        if "error" in row:
            print(f"| {size} | {row['variant']} | error: {row['error']} | | | |")
            continue
        print(f"| {size} | {row['variant']} | {row['fwd_gbs']:.0f} | {row['fwd_bwd_gbs']:.0f} | "
              f"{row['fwd_pct_copy']:.1f} | {row['fwd_bwd_pct_copy']:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two shapes instead of four")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--sweep", action="store_true", help="also time ours at other num_warps / grids")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA not available, skipping the RMSNorm benchmark")
        return 0
    from torchtitan_like.kernels import rmsnorm

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
        block_m, block_n, warps = rmsnorm._launch_config(shape[1])
        programs = rmsnorm._backward_programs(-(-shape[0] // block_m), block_n, torch.device(DEVICE))
        print(f"ours at {shape[0]}x{shape[1]}: BLOCK_M={block_m} BLOCK_N={block_n} num_warps={warps} "
              f"backward programs={programs}", flush=True)
        results += bench_shape(shape, fns, copy_gbs)
        if args.sweep:
            sweep += sweep_shape(shape, copy_gbs)
    print()
    print_table(results)
    if sweep:
        print("\nsweep of ours (launch heuristics):")
        print_table(sweep)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "copy_gbs": copy_gbs, "correctness": correctness,
                       "results": results, "sweep": sweep}, handle, indent=2)
    return 0 if all(errors["ok"] for errors in correctness.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
