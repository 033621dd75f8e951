"""Attention kernels at the training shape: each SDPA backend's forward + backward time, and its error
against an fp32 reference.

    python benchmarks/bench_attention.py [--seq 8192] [--heads 32] [--kv-heads 8] [--head-dim 128]
        [--backends cudnn,flash,efficient] [--reps 10] [--json out.json]

The inputs are laid out as the Llama attention hands them to `F.scaled_dot_product_attention`
(models/llama3/model.py): (batch, seq, heads, head_dim) viewed as (batch, heads, seq, head_dim), causal,
K and V repeated to the query heads. Each backend runs alone (`sdpa_kernel([backend])`), so a row is
that kernel or "unsupported". Rows marked "gqa" instead pass the un-repeated K and V with
`enable_gqa=True`, the call TorchTitan makes. They show whether a kernel accepts grouped-query
attention in this torch build, or would be passed over for the next one.

Error: the largest |kernel - reference| of the output and of dq, dk, dv, each divided by the
reference's largest |value|. The reference is the math backend in fp32 on the same (bf16-rounded)
inputs. The check fails (exit 1) above --tolerance. TFLOP/s count the causal work actually done:
forward 2 * batch * heads * seq^2 * head_dim (half of the two full matmuls), backward 2.5 times that.

Without CUDA it runs a tiny shape on the CPU kernels (flash, math) in fp32, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from torchtitan_like.models.llama3.model import repeat_kv  # noqa: E402

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def make_inputs(batch, seq, heads, kv_heads, head_dim, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(batch, seq, heads, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(batch, seq, kv_heads, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(batch, seq, kv_heads, head_dim, generator=generator).to(device, dtype)
    grad_out = torch.randn(batch, heads, seq, head_dim, generator=generator).to(device, dtype)
    return q, k, v, grad_out


def attention(q, k, v, gqa: bool):
    """The model's call: (b, s, h, d) tensors, causal, K/V repeated unless gqa."""
    if not gqa:
        n_rep = q.shape[2] // k.shape[2]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                          enable_gqa=gqa)


def forward_backward(q, k, v, grad_out, gqa):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, gqa)
    out.backward(grad_out)
    return out.detach(), q.grad, k.grad, v.grad


def relative_error(result, reference) -> float:
    return ((result.float() - reference).abs().max() / reference.abs().max()).item()


def time_ms(fn, device, reps: int) -> tuple[float, float]:
    """Median forward and forward + backward milliseconds."""
    q, k, v, grad_out, gqa = fn
    forward, total = [], []
    for _ in range(reps):
        qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
        if device.type == "cuda":
            start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            out = attention(qs, ks, vs, gqa)
            middle.record()
            out.backward(grad_out)
            end.record()
            torch.cuda.synchronize()
            forward.append(start.elapsed_time(middle))
            total.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            out = attention(qs, ks, vs, gqa)
            middle_time = time.perf_counter()
            out.backward(grad_out)
            end_time = time.perf_counter()
            forward.append((middle_time - begin) * 1e3)
            total.append((end_time - begin) * 1e3)
    return statistics.median(forward), statistics.median(total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="default 8192 on CUDA, 128 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    parser.add_argument("--kv-heads", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 on CUDA, 16 on CPU")
    parser.add_argument("--backends", default=None, help="comma list; default cudnn,flash,efficient (CPU: flash,math)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=3e-2)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda" if on_cuda else "cpu")
    dtype = torch.bfloat16 if on_cuda else torch.float32
    seq = args.seq or (8192 if on_cuda else 128)
    heads = args.heads or (32 if on_cuda else 4)
    kv_heads = args.kv_heads or (8 if on_cuda else 2)
    head_dim = args.head_dim or (128 if on_cuda else 16)
    backends = (args.backends or ("cudnn,flash,efficient" if on_cuda else "flash,math")).split(",")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        print(f"error: --backends {','.join(unknown)}: allowed {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    if not on_cuda:
        print("no CUDA device: a CPU smoke test at a tiny shape in fp32")
    header = (f"torch {torch.__version__}, {torch.cuda.get_device_name(0) if on_cuda else 'cpu'}, {dtype}, "
              f"batch {args.batch}, seq {seq}, heads {heads}, kv heads {kv_heads}, head_dim {head_dim}, causal")
    print(header)

    q, k, v, grad_out = make_inputs(args.batch, seq, heads, kv_heads, head_dim, dtype, device)
    with sdpa_kernel([SDPBackend.MATH]):
        reference = forward_backward(q.float(), k.float(), v.float(), grad_out.float(), gqa=False)
    forward_flops = 2.0 * args.batch * heads * seq * seq * head_dim
    rows, failed = [], False
    for name in backends:
        for gqa in (False, True):
            label = f"{name}{' gqa' if gqa else ''}"
            try:
                with sdpa_kernel([BACKENDS[name]]):
                    result = forward_backward(q, k, v, grad_out, gqa)
                    for _ in range(2):  # warm-up: plans, autotuning, allocator
                        forward_backward(q, k, v, grad_out, gqa)
                    forward_ms, total_ms = time_ms((q, k, v, grad_out, gqa), device, args.reps)
            except RuntimeError as error:
                rows.append({"backend": label, "supported": False, "reason": str(error).splitlines()[0][:160]})
                continue
            errors = [relative_error(got, want) for got, want in zip(result, reference)]
            ok = max(errors) <= args.tolerance
            failed |= not ok
            rows.append({"backend": label, "supported": True, "forward_ms": forward_ms, "total_ms": total_ms,
                         "forward_tflops": forward_flops / forward_ms / 1e9,
                         "total_tflops": 3.5 * forward_flops / total_ms / 1e9,
                         "errors": dict(zip(("out", "dq", "dk", "dv"), errors)), "ok": ok})

    print("\n| kernel | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | error out / dq / dk / dv | ok |")
    print("|---|---:|---:|---:|---:|---|---|")
    for row in rows:
        if not row["supported"]:
            print(f"| {row['backend']} | unsupported: {row['reason']} | | | | | |")
            continue
        errors = " / ".join(f"{value:.1e}" for value in row["errors"].values())
        print(f"| {row['backend']} | {row['forward_ms']:.2f} | {row['total_ms']:.2f} | {row['forward_tflops']:.0f} | "
              f"{row['total_tflops']:.0f} | {errors} | {row['ok']} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"setup": header, "rows": rows}, handle, indent=1)
    if not any(row["supported"] for row in rows):
        print("error: no backend ran", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
