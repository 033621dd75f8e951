"""Optimizer step bandwidth: torch's fused and foreach AdamW against TritonAdamW (kernels/adamw.py).

    python benchmarks/bench_optimizer.py                    # Llama 3.1 8B cut to 8 layers: 2.8 G fp32 params
    python benchmarks/bench_optimizer.py --quick            # 2 layers (1.5 G)
    python benchmarks/bench_optimizer.py --json out.json --sweep   # also TritonAdamW at other BLOCK / warps
    python benchmarks/bench_optimizer.py --check-large     # also a tensor over 2^31 elements (int64 offsets)

Parameters have the shapes of Llama 3.1 8B (dim 4096, 32 heads, 8 KV heads, FFN 14336, vocabulary
128256, untied output) with fewer layers, fp32, random gradients; matrices are weight-decayed, norms
not (as optim/optimizers.py groups them). One optimizer step is timed with CUDA events (median of
STEPS steps after WARMUP), launches included, as in training. Before timing, TritonAdamW is checked
against torch's fused AdamW on a slice of the parameters (two steps with grad_scale: AdamW and Adam
in fp32, AdamW in bf16); a "CHECK FAILED" line reports an error over CHECK_TOLERANCES (where each
comes from is said there), and the exit status is 1.

Byte model, per fp32 parameter and step (the gradient norm, computed before every variant's step,
is not counted):
- torch fused + grad_scale: reads p, g, m, v; writes p, m, v and the divided g: 32 B
- torch fused (no clip): reads p, g, m, v; writes p, m, v: 28 B
- torch foreach + foreach clip: the clip's multiply reads and writes g (8 B), then foreach AdamW:
  p *= 1 - lr wd (8), lerp m (12), v *= beta2 (8), v += (1 - beta2) g g (12), sqrt(v) into a
  temporary (8), divide (8) and add eps (8) in place, p addcdiv (16): 88 B
- TritonAdamW + grad_scale: reads p, g, m, v; writes p, m, v: 28 B
- TritonAdamW, split master weights + grad_scale (`training.master_weights = "split"`): reads the
  bf16 half and int16 remainder (4), the bf16 g (2), m, v (8); writes both halves (4), m, v (8): 26 B.
  Checked first: the split step equals the fp32 step on the joined value (`check_split`).
- copy (reference): exp_avg <- p and exp_avg_sq <- g, tensor by tensor: 16 B
Without CUDA the script prints a message and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

DEVICE = "cuda"
WARMUP, STEPS = 3, 10
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.95), 1e-8, 0.1
GRAD_SCALE = 2.0  # a power of two: the gradients torch's fused kernel writes back stay exact
# max |ours - torch fused| / max |torch fused| per tensor. fp32 AdamW: a few ulps (torch's fused kernel
# divides by grad_scale in double, moments as beta1 m + (1 - beta1) g, not lerp). Adam: its L2 term
# g / scale + wd p nearly cancels for some elements, where the ulp that the division left becomes a
# large relative difference of g, which sqrt(v) ~ |g| (comparable to eps) does not cancel: 3e-6 on
# an H200. bf16: one rounding of the result (2^-8).
CHECK_TOLERANCES = {"AdamW float32": 1e-6, "Adam float32": 1e-5, "AdamW bfloat16": 1e-2}
CHECK_TOLERANCE = CHECK_TOLERANCES["AdamW float32"]
DIM, N_KV_HEADS, HEAD_DIM, FFN_DIM, VOCAB = 4096, 8, 128, 14336, 128256
BYTES_PER_PARAM = {"torch fused + grad_scale": 32, "torch fused (no clip)": 28,
                   "torch foreach + foreach clip": 88, "TritonAdamW + grad_scale": 28, "copy (reference)": 16,
                   "TritonAdamW split master weights + grad_scale": 26}
SPLIT = "TritonAdamW split master weights + grad_scale"
SWEEP = [(512, 4), (1024, 2), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (4096, 16), (8192, 16)]


def llama_shapes(n_layers: int) -> list[tuple[int, ...]]:
    """Llama 3.1 8B parameter shapes in module order, cut to n_layers."""
    layer = [(DIM, DIM), (N_KV_HEADS * HEAD_DIM, DIM), (N_KV_HEADS * HEAD_DIM, DIM), (DIM, DIM),  # wq wk wv wo
             (FFN_DIM, DIM), (DIM, FFN_DIM), (FFN_DIM, DIM), (DIM,), (DIM,)]  # w1 w2 w3, the two norms
    return [(VOCAB, DIM)] + layer * n_layers + [(DIM,), (VOCAB, DIM)]


def make_params(shapes) -> list[torch.nn.Parameter]:
    params = []
    for shape in shapes:
        param = torch.nn.Parameter(torch.randn(shape, device=DEVICE) * 0.02)
        param.grad = torch.randn(shape, device=DEVICE)
        params.append(param)
    return params


def param_groups(params) -> list[dict]:
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def time_steps(step) -> float:
    """Median ms of `step()` over STEPS calls after WARMUP, each between two CUDA events."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(STEPS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def build(implementation: str, params):
    from torchtitan_like.kernels.adamw import TritonAdamW

    if implementation.startswith("TritonAdamW"):
        return TritonAdamW(param_groups(params), lr=LR, betas=BETAS, eps=EPS)
    return torch.optim.AdamW(param_groups(params), lr=LR, betas=BETAS, eps=EPS,
                             fused=implementation.startswith("torch fused"), foreach="foreach" in implementation)


def step_function(implementation: str, optimizer, params):
    grad_scale = torch.tensor(GRAD_SCALE, device=DEVICE)
    if "grad_scale" in implementation:
        optimizer.grad_scale = grad_scale
    if "foreach clip" in implementation:
        grads, clip_coefficient = [p.grad for p in params], 1.0 / grad_scale

        def step():
            torch._foreach_mul_(grads, clip_coefficient)  # clip_grads_with_norm_'s multiply
            optimizer.step()
        return step
    return optimizer.step


def check_against_fused(params, optimizer_name: str = "AdamW", dtype=torch.float32) -> dict:
    """TritonAdamW / TritonAdam and torch's fused optimizer, both with grad_scale, on copies of a
    slice of the parameters (a projection, a norm, an odd-sized piece of the embedding) in `dtype`,
    two steps: per step and tensor, max |ours - fused| / max |fused| over the pieces."""
    from torchtitan_like.kernels.adamw import TritonAdam, TritonAdamW

    classes = {"AdamW": (torch.optim.AdamW, TritonAdamW), "Adam": (torch.optim.Adam, TritonAdam)}[optimizer_name]
    pieces = [params[1].detach()[:1024], params[8].detach(), params[0].detach().flatten()[:1_000_003]]
    pieces = [piece.to(dtype) for piece in pieces]
    grads = [torch.randn_like(piece) for piece in pieces]
    snapshots = []  # per optimizer, per step, per piece: (param, exp_avg, exp_avg_sq)
    for optimizer_class, options in ((classes[0], dict(fused=True)), (classes[1], {})):
        copies = [torch.nn.Parameter(piece.clone()) for piece in pieces]
        optimizer = optimizer_class(copies, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **options)
        optimizer.grad_scale = torch.tensor(3.0, device=DEVICE)
        steps = []
        for _ in range(2):
            for copy, grad in zip(copies, grads):
                copy.grad = grad.clone()
            optimizer.step()
            steps.append([(copy.detach().clone(), optimizer.state[copy]["exp_avg"].clone(),
                           optimizer.state[copy]["exp_avg_sq"].clone()) for copy in copies])
        snapshots.append(steps)
    errors = {}
    for step, (fused_pieces, ours_pieces) in enumerate(zip(*snapshots), start=1):
        for index, name in enumerate(("param", "exp_avg", "exp_avg_sq")):
            errors[f"step {step} {name}"] = max(
                float((ours[index].float() - fused[index].float()).abs().max()
                      / fused[index].float().abs().max().clamp_min(1e-30))
                for ours, fused in zip(ours_pieces, fused_pieces))
    return errors


def split_params(params) -> list[torch.nn.Parameter]:
    """bf16 halves with int16 remainders of `params`, bf16 gradients (master_weights.py)."""
    from torchtitan_like import master_weights

    module = torch.nn.ParameterList(params)
    master_weights.convert_to_split([module])
    for param in module:
        param.grad = torch.randn_like(param)
    return list(module)


def check_split(params) -> float:
    """Two steps of the split kernel against two of the fp32 kernel on the joined values and the
    same (bf16) gradients, on a slice: max |split - fp32| / max |fp32| of the masters (0: bit for bit)."""
    from torchtitan_like import master_weights
    from torchtitan_like.kernels.adamw import TritonAdamW

    pieces = [params[1].detach()[:1024].clone(), params[0].detach().flatten()[:1_000_003].clone()]
    split = split_params([torch.nn.Parameter(piece.clone()) for piece in pieces])
    plain = [torch.nn.Parameter(master_weights.master_value(param)) for param in split]
    optimizers = [TritonAdamW(group, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
                  for group in (split, plain)]
    for _ in range(2):
        for split_param, plain_param in zip(split, plain):
            split_param.grad = torch.randn_like(split_param)
            plain_param.grad = split_param.grad.float()
        for optimizer in optimizers:
            optimizer.grad_scale = torch.tensor(3.0, device=DEVICE)
            optimizer.step()
    errors = []
    for split_param, plain_param in zip(split, plain):
        want = plain_param.detach()
        errors.append(float((master_weights.master_value(split_param) - want).abs().max()
                            / want.abs().max().clamp_min(1e-30)))
    return max(errors)


def check_large_tensor() -> float:
    """A tensor of 2^31 + 4099 elements (int64 offsets): max relative error of its last 1M
    elements against the plain-torch reference math; 34 GB, freed before the benchmark."""
    from torchtitan_like.kernels.adamw import adam_step_, adam_step_reference

    n = 2 ** 31 + 4099
    tensors = [torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE),
               torch.rand(n, device=DEVICE)]
    tails = [t[-2 ** 20:].clone() for t in tensors]
    options = dict(step=5, lr=1e-2, beta1=BETAS[0], beta2=BETAS[1], eps=EPS, weight_decay=WEIGHT_DECAY,
                   decoupled_weight_decay=True)
    adam_step_(*tensors, **options)
    adam_step_reference(*tails, **options)
    error = max(float((t[-2 ** 20:] - tail).abs().max() / tail.abs().max()) for t, tail in zip(tensors, tails))
    del tensors, tails
    torch.cuda.empty_cache()
    return error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 layers instead of 8")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--sweep", action="store_true", help="also time TritonAdamW at other BLOCK / num_warps")
    parser.add_argument("--check-large", action="store_true",
                        help="also check one tensor over 2^31 elements (34 GB of GPU memory)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("CUDA not available, skipping the optimizer benchmark")
        return 0
    import triton

    from torchtitan_like.kernels import adamw

    began = time.perf_counter()
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}; torch {torch.__version__}; triton {triton.__version__}")
    checks_ok = True
    if args.check_large:
        error = check_large_tensor()
        checks_ok &= error <= CHECK_TOLERANCE
        print(f"check of a 2^31 + 4099 element tensor (last 1M elements vs reference math): {error:.2e}"
              + ("" if error <= CHECK_TOLERANCE else f" CHECK FAILED (> {CHECK_TOLERANCE:.0e})"), flush=True)
    params = make_params(llama_shapes(2 if args.quick else 8))
    n_params = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n_params / 1e9:.2f} G fp32 parameters", flush=True)

    checks = {}
    for name, dtype in (("AdamW", torch.float32), ("Adam", torch.float32), ("AdamW", torch.bfloat16)):
        label = f"{name} {str(dtype).removeprefix('torch.')}"
        checks[label] = check_against_fused(params, name, dtype)
        worst, tolerance = max(checks[label].values()), CHECK_TOLERANCES[label]
        checks_ok &= worst <= tolerance
        print(f"check {label} vs torch fused (max |ours - fused| / max |fused|): "
              + ", ".join(f"{key} {value:.2e}" for key, value in checks[label].items()))
        if worst > tolerance:
            print(f"CHECK FAILED: {label} max relative error {worst:.2e} > {tolerance:.0e}")

    split_error = check_split(params)
    checks["split vs fp32 step"] = split_error
    checks_ok &= split_error <= CHECK_TOLERANCE
    print(f"check split master weights vs the fp32 step on the joined values: {split_error:.2e}"
          + (" (bit for bit)" if split_error == 0 else "")
          + ("" if split_error <= CHECK_TOLERANCE else f" CHECK FAILED (> {CHECK_TOLERANCE:.0e})"), flush=True)

    timings: dict[str, float] = {}
    for implementation in [name for name in BYTES_PER_PARAM if name not in ("copy (reference)", SPLIT)]:
        for param in params:
            param.grad.normal_()  # torch's fused kernel wrote the divided gradients back
        optimizer = build(implementation, params)
        timings[implementation] = time_steps(step_function(implementation, optimizer, params))
        print(f"{implementation}: {timings[implementation]:.2f} ms ({time.perf_counter() - began:.0f}s)", flush=True)
        if implementation.startswith("TritonAdamW"):
            if args.sweep:
                default = (adamw.BLOCK, adamw.NUM_WARPS)
                for block, warps in SWEEP:
                    adamw.BLOCK, adamw.NUM_WARPS = block, warps
                    name = f"TritonAdamW + grad_scale, BLOCK {block}, {warps} warps"
                    timings[name] = time_steps(optimizer.step)
                    BYTES_PER_PARAM[name] = BYTES_PER_PARAM["TritonAdamW + grad_scale"]
                    print(f"{name}: {timings[name]:.2f} ms", flush=True)
                adamw.BLOCK, adamw.NUM_WARPS = default
            # last: the copy overwrites the optimizer's states with parameters and gradients
            states = [(optimizer.state[p]["exp_avg"], optimizer.state[p]["exp_avg_sq"]) for p in params]

            def copy(states=states):
                for param, (exp_avg, exp_avg_sq) in zip(params, states):
                    exp_avg.copy_(param)
                    exp_avg_sq.copy_(param.grad)
            timings["copy (reference)"] = time_steps(copy)
            del states
        del optimizer
        torch.cuda.empty_cache()

    # last: bf16 halves, remainders and gradients beside the fp32 parameters (6 more bytes each)
    split = split_params([torch.nn.Parameter(param.detach().clone()) for param in params])
    optimizer = build(SPLIT, split)
    timings[SPLIT] = time_steps(step_function(SPLIT, optimizer, split))
    print(f"{SPLIT}: {timings[SPLIT]:.2f} ms ({time.perf_counter() - began:.0f}s)", flush=True)
    del optimizer, split
    torch.cuda.empty_cache()

    copy_gbs = BYTES_PER_PARAM["copy (reference)"] * n_params / (timings["copy (reference)"] * 1e-3) / 1e9
    rows = []
    for implementation, ms in timings.items():
        moved = BYTES_PER_PARAM[implementation] * n_params
        gbs = moved / (ms * 1e-3) / 1e9
        rows.append({"implementation": implementation, "ms_per_step": ms,
                     "bytes_per_param": BYTES_PER_PARAM[implementation], "gb_per_step": moved / 1e9,
                     "gb_per_s": gbs, "pct_of_copy": 100 * gbs / copy_gbs})
    print(f"\n{n_params / 1e9:.2f} G fp32 parameters, median of {STEPS} steps after {WARMUP} "
          f"(total {time.perf_counter() - began:.0f}s):\n")
    print("| implementation | ms/step | bytes/param | GB moved/step | GB/s | % of copy |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['implementation']} | {row['ms_per_step']:.2f} | {row['bytes_per_param']} | "
              f"{row['gb_per_step']:.1f} | {row['gb_per_s']:.0f} | {row['pct_of_copy']:.1f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": device_name, "torch": torch.__version__, "triton": triton.__version__,
                       "parameters": n_params, "checks": checks, "checks_ok": checks_ok, "rows": rows},
                      handle, indent=2)
    return 0 if checks_ok else 1


if __name__ == "__main__":
    sys.exit(main())
