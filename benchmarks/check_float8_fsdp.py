"""Device check: FSDP2 with the fp8 all-gather of weights gives the same results as without it.

    python benchmarks/check_float8_fsdp.py [--dim 4096] [--hidden 14336] [--tokens 8192] [--compile]
    torchrun --nproc-per-node N benchmarks/check_float8_fsdp.py ...      (several GPUs)

Builds a SwiGLU-shaped pair of Float8Linear layers (tensorwise) twice, on the meta device as the
trainer does, shards both with `fully_shard` (bf16 parameters on CUDA through the mixed-precision
policy, fp32 on CPU; `--param-dtype` overrides, so CPU checks the bf16 path too), and runs forward + backward on the same batch: once with the weights
all-gathered in the param dtype, once in fp8 (`kernels/float8/fsdp.py`). The fp8 operands are the
same bits either way, so outputs and gradients must be bitwise equal. Prints one table row and exits
1 on a mismatch. One process works too (a world of one still goes through FSDP2's all-gather hooks),
which is how a one-GPU lease checks the CUDA path: the Triton cast before the all-gather, the uint8
collective, and `_scaled_mm` on the gathered fp8 weight. On CPU the GEMMs are emulated (gloo).
`--compile` runs under torch 2.13; under torch 2.11 (CPU, seen here) Dynamo fails an assertion when
the gathered fp8 weight enters Float8Linear's autograd Function, so the GPU suite runs it eagerly.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


def build(dim: int, hidden: int, all_gather: bool, device: torch.device, mesh, compile_model: bool,
          dtype: torch.dtype) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from torchtitan_like.distributed.tensors import assign_full_value
    from torchtitan_like.kernels.float8 import Float8Linear, enable_float8_all_gather

    emulate = device.type != "cuda"
    with torch.device("meta"):
        model = nn.Sequential(Float8Linear(dim, hidden, bias=False, emulate=emulate),
                              nn.SiLU(), Float8Linear(hidden, dim, bias=False, emulate=emulate))
    if all_gather:
        for layer in (model[0], model[2]):
            enable_float8_all_gather(layer)
    if compile_model:  # the pair is one FSDP unit compiled as a whole, like the trainer's blocks
        model.compile(fullgraph=True, backend="inductor" if device.type == "cuda" else "aot_eager")
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    model.to_empty(device=device)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, shape in ((model[0], (hidden, dim)), (model[2], (dim, hidden))):
            assign_full_value(layer.weight, torch.randn(shape, generator=generator) * shape[1] ** -0.5)
    return model


def forward_backward(model: nn.Module, x: torch.Tensor, grad_output: torch.Tensor) -> list[torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.backward(grad_output)
    return [y.detach(), x.grad] + [param.grad.full_tensor() for param in model.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=14336)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--compile", action="store_true", help="compile the pair (inductor on CUDA)")
    parser.add_argument("--param-dtype", choices=("bfloat16", "float32"), default=None,
                        help="FSDP's mixed-precision param dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)

    from torch.distributed.device_mesh import init_device_mesh

    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29517"), ("RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    on_cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if on_cuda else torch.device("cpu")
    if on_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if on_cuda else "gloo")
    try:
        mesh = init_device_mesh(device.type, (world_size,))
        generator = torch.Generator().manual_seed(1 + rank)
        dtype = getattr(torch, args.param_dtype) if args.param_dtype else (torch.bfloat16 if on_cuda else torch.float32)
        x = torch.randn(args.tokens, args.dim, generator=generator).to(device, dtype)
        grad_output = torch.randn(args.tokens, args.dim, generator=generator).to(device, dtype)
        results = [forward_backward(build(args.dim, args.hidden, all_gather, device, mesh, args.compile, dtype),
                                    x, grad_output) for all_gather in (False, True)]
        names = ("y", "dx", "dW1", "dW2")
        equal = [torch.equal(a, b) for a, b in zip(*results)]
        nonzero = all(t.abs().sum() > 0 for t in results[1])
        if rank == 0:
            print("| device | world | shape | param dtype | compile | bitwise equal (y, dx, dW1, dW2) | "
                  "gradients non-zero |")
            print("|---|---|---|---|---|---|---|")
            print(f"| {torch.cuda.get_device_name(device) if on_cuda else 'cpu'} | {world_size} | "
                  f"{args.tokens}x{args.dim}->{args.hidden}->{args.dim} | {str(dtype).removeprefix('torch.')} | "
                  f"{args.compile} | "
                  f"{', '.join(f'{n}={e}' for n, e in zip(names, equal))} | {nonzero} |")
        return 0 if all(equal) and nonzero else 1
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
