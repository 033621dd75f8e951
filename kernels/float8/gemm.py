"""FP8 GEMM with the dequantization scales in the epilogue: Triton kernel, `torch._scaled_mm`
backend, emulation, and the fp64 reference.

Math: given a_fp8 (M, K), b_fp8 (K, N) and dequantization scales (the reciprocals of the
quantization scales of quantize.py, the convention of `torch._scaled_mm`):

    C = (a_fp8 @ b_fp8) * scale_a * scale_b          accumulated in fp32, written in bf16 or fp32

tensorwise: scale_a, scale_b are fp32 scalars (shape ()); rowwise: scale_a is (M, 1) and scale_b
(1, N), one per row of a and per column of b, i.e. per slice along the contraction dim K, so the
scales factor out of the dot product and can be applied once in the epilogue.

Layout: `a` row-major and `b` column-major (b.t() contiguous): both operands are read along K,
the layout Hopper's fp8 wgmma wants and the one `torch._scaled_mm` requires.

Backends (`scaled_mm(..., backend=)`):
- "triton": `_fp8_gemm_kernel`, tiled 128x128x128 with grouped program order (GROUP_M rows of tiles
  share B tiles in L2) on CUDA; 16x16x32 tiles under the CPU interpreter.
- "torch":  `torch._scaled_mm` (cuBLASLt / CUTLASS). It needs M, K, N multiples of 16 and bf16 output
  for rowwise scales; other shapes fall back to Triton, fp32 rowwise output is computed in bf16.
- "emulate": dequantize to fp32 and matmul (any device; CPU tests, devices without fp8).
`resolve_backend` maps the config's "auto" to "torch" on CUDA devices with compute capability
>= 8.9 and "triton" otherwise (the Triton interpreter on CPU).

use_fast_accum=False (default) promotes the tensor-core partial sums to the fp32 accumulator after
every BLOCK_K slice (Triton's max_num_imprecise_acc=BLOCK_K); True accumulates the whole K inside
the tensor core (faster, less precise; what torchao uses for the forward output GEMM).
"""

from __future__ import annotations

import torch

from torchtitan_like.kernels.float8.quantize import new_output, triton, triton_available

if triton is not None:
    import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages); 4 stages of 128x128 A and B fp8
# tiles use 128 KiB of the H100's 227 KiB shared memory.
CUDA_CONFIG = (128, 128, 128, 8, 8, 4)
CUDA_AUTOTUNE_CONFIGS = [(128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3),
                         (64, 128, 128, 8, 4, 4)]
INTERPRETER_CONFIG = (16, 16, 32, 2, 1, 1)


if triton is not None:

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, M, N, K,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                         ROWWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
        # Grouped ordering: consecutive programs walk GROUP_M tile rows down one tile column, so the
        # B tiles they share stay in L2 (Triton matmul tutorial).
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/columns wrap around (valid addresses, no load masks); the store masks them.
        offs_am = offs_m % M
        offs_bn = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_am[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_bn[None, :].to(tl.int64) * stride_bn

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_left = K - k * BLOCK_K
                a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
                b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
            if FAST_ACCUM:
                acc = tl.dot(a, b, acc)
            else:
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        m_in = offs_m < M
        n_in = offs_n < N
        if ROWWISE:
            scale_a = tl.load(scale_a_ptr + offs_m, mask=m_in, other=0.0)
            scale_b = tl.load(scale_b_ptr + offs_n, mask=n_in, other=0.0)
            acc = acc * scale_a[:, None] * scale_b[None, :]
        else:
            acc = acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))
        c = acc.to(c_ptr.dtype.element_ty)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=m_in[:, None] & n_in[None, :])

    _autotuned_kernel = None

    def _get_autotuned_kernel():
        """The kernel behind a small `triton.autotune` list (CUDA only; built on first use)."""
        global _autotuned_kernel
        if _autotuned_kernel is None:
            configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
                                     num_warps=w, num_stages=s) for bm, bn, bk, g, w, s in CUDA_AUTOTUNE_CONFIGS]
            _autotuned_kernel = triton.autotune(configs=configs, key=["M", "N", "K"])(_fp8_gemm_kernel)
        return _autotuned_kernel


def _check_operands(a, b, scale_a, scale_b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8 gemm needs a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    rowwise = scale_a.numel() != 1 or scale_b.numel() != 1
    if rowwise and (tuple(scale_a.shape) != (a.shape[0], 1) or tuple(scale_b.shape) != (1, b.shape[1])):
        raise ValueError(f"rowwise scales must be (M, 1) and (1, N), got {tuple(scale_a.shape)}, {tuple(scale_b.shape)}")
    return rowwise


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, use_fast_accum: bool = False,
             out: torch.Tensor | None = None, autotune: bool = False) -> torch.Tensor:
    """Triton C = (a @ b) * scale_a * scale_b; arguments as `torch._scaled_mm` (see module docstring)."""
    rowwise = _check_operands(a, b, scale_a, scale_b)
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = new_output((M, N), out_dtype, a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    scale_a = scale_a.float().contiguous().reshape(-1)
    scale_b = scale_b.float().contiguous().reshape(-1)
    common = dict(ROWWISE=rowwise, FAST_ACCUM=use_fast_accum)
    args = (a, b, out, scale_a, scale_b, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
            out.stride(0), out.stride(1))
    if autotune and a.is_cuda:
        kernel = _get_autotuned_kernel()
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        kernel[grid](*args, EVEN_K=K % 256 == 0, **common)  # 256: divisible by every config's BLOCK_K
        return out
    block_m, block_n, block_k, group_m, warps, stages = CUDA_CONFIG if a.is_cuda else INTERPRETER_CONFIG
    grid = (triton.cdiv(M, block_m) * triton.cdiv(N, block_n),)
    _fp8_gemm_kernel[grid](*args, EVEN_K=K % block_k == 0, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           GROUP_M=group_m, num_warps=warps, num_stages=stages, **common)
    return out


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Dequantize to fp32 and matmul: the numerics of fp8 storage without fp8 tensor cores."""
    _check_operands(a, b, scale_a, scale_b)
    return ((a.float() * scale_a.float()) @ (b.float() * scale_b.float())).to(out_dtype)


def scaled_mm_reference(a, b, scale_a, scale_b) -> torch.Tensor:
    """fp64 product of the dequantized operands (what tests compare every backend with)."""
    return (a.double() * scale_a.double()) @ (b.double() * scale_b.double())


def _torch_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    rowwise = _check_operands(a, b, scale_a, scale_b)
    if any(d % 16 for d in (a.shape[0], a.shape[1], b.shape[1])):
        return fp8_gemm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=use_fast_accum)
    if not b.t().is_contiguous():
        b = b.t().contiguous().t()
    mm_dtype = torch.bfloat16 if rowwise else out_dtype  # rowwise _scaled_mm only writes bf16
    scale_a = scale_a.float().contiguous() if rowwise else scale_a.float().reshape(())
    scale_b = scale_b.float().contiguous() if rowwise else scale_b.float().reshape(())
    out = torch._scaled_mm(a.contiguous(), b, scale_a, scale_b, out_dtype=mm_dtype, use_fast_accum=use_fast_accum)
    return out if mm_dtype == out_dtype else out.to(out_dtype)


def resolve_backend(backend: str, device: torch.device, emulate: bool) -> str:
    """Config backend ("auto"|"triton"|"torch") + emulate flag -> "triton"|"torch"|"emulate"."""
    if backend not in BACKENDS:
        raise ValueError(f"float8 backend must be one of {BACKENDS}, got {backend!r}")
    if emulate:
        return "emulate"
    if backend != "auto":
        return backend
    if device.type == "cuda" and hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9):
        return "torch"
    return "triton" if triton_available(device) else "emulate"


def scaled_mm(a, b, scale_a, scale_b, out_dtype: torch.dtype, backend: str,
              use_fast_accum: bool = False) -> torch.Tensor:
    """Dispatch one fp8 GEMM to a resolved backend ("triton", "torch" or "emulate")."""
    if backend == "emulate":
        return emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype)
    if backend == "torch":
        return _torch_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum)
    if backend == "triton":
        return fp8_gemm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=use_fast_accum)
    raise ValueError(f"unresolved float8 backend {backend!r}")
