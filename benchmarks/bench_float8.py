"""Float8 benchmark: FP8 GEMM TFLOP/s, quantize GB/s, Float8Linear fwd+bwd vs bf16 nn.Linear.

    python benchmarks/bench_float8.py [--quick] [--json PATH] [--autotune]

CUDA only (H100/H200); on a machine without CUDA it says so and exits 0. Every timed function is
first checked against its reference. Timings are medians of `triton.testing.do_bench`.
Shapes: Llama 3 8B (dim 4096, kv 1024, FFN 14336) and 70B (dim 8192, kv 1024, FFN 28672) linear
projections at M = 8192 and 16384 tokens, plus 8192^3. --quick: 8B at M=8192 and 8192^3 only.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys

import torch

LLAMA_SHAPES = {  # name: (K, N) of y = x (M, K) @ W^T (K -> N)
    "8B q/o": (4096, 4096), "8B kv": (4096, 1024), "8B w1/w3": (4096, 14336), "8B w2": (14336, 4096),
    "70B q/o": (8192, 8192), "70B kv": (8192, 1024), "70B w1/w3": (8192, 28672), "70B w2": (28672, 8192),
}


def _bench(fn) -> float:
    """Median milliseconds of fn()."""
    from triton.testing import do_bench
    if "return_mode" in inspect.signature(do_bench).parameters:
        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    return do_bench(fn, warmup=10, rep=40, quantiles=[0.5])[0]


def _gemm_shapes(quick: bool):
    shapes = [("8192^3", 8192, 8192, 8192)]
    for name, (k, n) in LLAMA_SHAPES.items():
        for m in ((8192,) if quick else (8192, 16384)):
            if quick and name.startswith("70B"):
                continue
            shapes.append((name, m, k, n))
    return shapes


CHECK_FAILURES: list[str] = []


def _check(ok: bool, message: str) -> None:
    """Record a failed correctness check and keep going, so one bad kernel does not hide the rest."""
    if not ok:
        CHECK_FAILURES.append(message)
        print(f"CHECK FAILED: {message}", flush=True)


def _table(title, header, rows):
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in row) + " |")


def bench_gemm(quick: bool, autotune: bool):
    from torchtitan_like.kernels.float8 import gemm as g
    from torchtitan_like.kernels.float8 import quantize as q

    header = ["shape", "M", "K", "N", "bf16 matmul", "triton tw", "_scaled_mm tw", "triton rw", "_scaled_mm rw"]
    if autotune:
        header += ["triton tw (autotune)"]
    rows, records = [], []
    for name, m, k, n in _gemm_shapes(quick):
        x, w = torch.randn(m, k, device="cuda"), torch.randn(n, k, device="cuda") * 0.02
        x_bf16, w_bf16 = x.bfloat16(), w.bfloat16()
        xa, _, xs = q.tensorwise_quantize(x, q.E4M3)
        wa, _, ws = q.tensorwise_quantize(w, q.E4M3)
        tw = (xa, wa.t(), xs.reciprocal(), ws.reciprocal())
        xr, xrs = q.rowwise_quantize(x, q.E4M3)
        wr, wrs = q.rowwise_quantize(w, q.E4M3)
        rw = (xr, wr.t(), xrs.reciprocal(), wrs.reciprocal().t())
        candidates = {
            "bf16 matmul": lambda: torch.matmul(x_bf16, w_bf16.t()),
            "triton tw": lambda: g.fp8_gemm(*tw, torch.bfloat16),
            "_scaled_mm tw": lambda: g.scaled_mm(*tw, torch.bfloat16, "torch"),
            "triton rw": lambda: g.fp8_gemm(*rw, torch.bfloat16),
            "_scaled_mm rw": lambda: g.scaled_mm(*rw, torch.bfloat16, "torch"),
        }
        if autotune:
            candidates["triton tw (autotune)"] = lambda: g.fp8_gemm(*tw, torch.bfloat16, autotune=True)
        for label, fn in candidates.items():  # correctness before timing (on a row slice: fp64 is slow)
            if label == "bf16 matmul":
                continue
            ops = rw if " rw" in label else tw
            ref = g.scaled_mm_reference(ops[0][:256], ops[1], ops[2][:256] if ops[2].dim() else ops[2], ops[3])
            error = (fn()[:256].double() - ref).abs().max().item() / ref.abs().max().item()
            _check(error < 1e-2, f"{label} at {name} M={m}: relative error {error:.3g}")
        flops = 2 * m * n * k
        tflops = {label: flops / _bench(fn) / 1e9 for label, fn in candidates.items()}
        rows.append([name, m, k, n] + [tflops[h] for h in header[4:]])
        records.append({"shape": name, "M": m, "K": k, "N": n, "tflops": tflops})
        del x, w, x_bf16, w_bf16, tw, rw
    _table("FP8 GEMM, TFLOP/s (bf16 output)", header, rows)
    return records


def bench_quantize(quick: bool):
    from torchtitan_like.kernels.float8 import quantize as q

    rows, records = [], []
    shapes = [(8192, 4096), (8192, 14336)] + ([] if quick else [(16384, 8192), (16384, 28672)])
    for m, k in shapes:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        # bit-exact check against the reference cast first
        checks = [(q.tensorwise_quantize(x, q.E4M3, "also"), q.tensorwise_quantize_reference(x, q.E4M3), (0, 1, 2)),
                  (q.rowwise_quantize(x, q.E4M3), q.rowwise_quantize_reference(x, q.E4M3), (0, 1)),
                  (q.colwise_quantize_t(x, q.E5M2), q.colwise_quantize_t_reference(x, q.E5M2), (0, 1))]
        for ours, ref, indices in checks:
            for i in indices:
                a, b = ours[i], ref[i]
                equal = torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)
                _check(equal, f"quantize output {i} of {ours[0].dtype if ours[0] is not None else ''} case differs "
                              f"from the reference at {m}x{k} (check order: tensorwise, rowwise, colwise)")
        cases = {  # name: (ours, torch reference, bytes moved by ours)
            "tensorwise": (lambda: q.tensorwise_quantize(x, q.E4M3), lambda: q.tensorwise_quantize_reference(x, q.E4M3)[0],
                           x.numel() * (2 + 2 + 1)),  # amax read, cast read, fp8 write
            "tensorwise + transpose": (lambda: q.tensorwise_quantize(x, q.E4M3, "also"),
                                       lambda: q.tensorwise_quantize_reference(x, q.E4M3)[:2], x.numel() * (2 + 2 + 2)),
            "rowwise": (lambda: q.rowwise_quantize(x, q.E4M3), lambda: q.rowwise_quantize_reference(x, q.E4M3),
                        x.numel() * (2 + 1)),
            "colwise transposed": (lambda: q.colwise_quantize_t(x, q.E4M3), lambda: q.colwise_quantize_t_reference(x, q.E4M3),
                                   x.numel() * (2 + 2 + 1)),
        }
        for name, (ours, ref, nbytes) in cases.items():
            ms_ours, ms_ref = _bench(ours), _bench(ref)
            rows.append([name, f"{m}x{k}", nbytes / ms_ours / 1e6, nbytes / ms_ref / 1e6, ms_ref / ms_ours])
            records.append({"kind": name, "shape": [m, k], "ms_triton": ms_ours, "ms_torch": ms_ref})
    _table("Quantize (bf16 -> fp8), effective GB/s (bytes the fused kernel must move)",
           ["kind", "shape", "triton GB/s", "torch ref GB/s", "speedup"], rows)
    return records


def bench_linear(quick: bool):
    from torchtitan_like.kernels.float8 import Float8Linear

    rows, records = [], []
    m = 8192
    for k, n in ((4096, 14336), (14336, 4096)):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        base = torch.nn.Linear(k, n, bias=False, device="cuda")  # fp32 master weight, bf16 activations
        bf16_layer = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        bf16_layer.weight.data.copy_(base.weight.data)

        def step(layer):
            x.grad = None
            layer.weight.grad = None
            layer(x).backward(grad)

        ms_bf16 = _bench(lambda: step(bf16_layer))
        for recipe in ("tensorwise", "rowwise"):
            for backend in ("triton", "torch"):
                layer = Float8Linear.from_linear(base, recipe=recipe, backend=backend)
                y = layer(x)  # check vs bf16 linear: fp8 error is a few percent
                error = ((y.float() - bf16_layer(x).float()).norm() / bf16_layer(x).float().norm()).item()
                _check(error < 0.1, f"Float8Linear {recipe}/{backend} {k}->{n}: relative error {error:.3g} vs bf16")
                ms = _bench(lambda: step(layer))
                rows.append([f"{k}->{n}", recipe, backend, ms_bf16, ms, ms_bf16 / ms, m / ms * 1e3])
                records.append({"shape": [m, k, n], "recipe": recipe, "backend": backend, "ms_bf16": ms_bf16,
                                "ms_float8": ms, "tokens_per_second_ratio": ms_bf16 / ms})
        del x, grad
    _table(f"Float8Linear forward+backward, M = {m} tokens (ratio > 1: faster than bf16)",
           ["shape", "recipe", "backend", "bf16 ms", "float8 ms", "tokens/s ratio", "float8 tokens/s"], rows)
    return records


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--autotune", action="store_true", help="also time the autotuned Triton GEMM")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_float8: CUDA is not available; nothing to benchmark (needs an H100/H200 class GPU).")
        return 0
    if torch.cuda.get_device_capability() < (8, 9):
        print(f"bench_float8: {torch.cuda.get_device_name()} has no fp8 tensor cores (needs sm89+).")
        return 0
    torch.manual_seed(0)
    import triton
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    for section, run in (("gemm", lambda: bench_gemm(args.quick, args.autotune)),
                         ("quantize", lambda: bench_quantize(args.quick)), ("linear", lambda: bench_linear(args.quick))):
        try:  # a section that crashes (e.g. an unsupported Triton feature) must not hide the others
            results[section] = run()
        except Exception as error:  # noqa: BLE001
            _check(False, f"section {section} crashed: {type(error).__name__}: {error}")
        torch.cuda.empty_cache()
    results["check_failures"] = CHECK_FAILURES
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    if CHECK_FAILURES:
        print(f"\n{len(CHECK_FAILURES)} correctness check(s) failed:\n  " + "\n  ".join(CHECK_FAILURES))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
