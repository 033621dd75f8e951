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
- "triton": on Hopper `_fp8_gemm_tma_kernel`, persistent (one program per SM, grouped tile order:
  GROUP_M rows of tiles share B tiles in L2) with TMA loads, 128x256x128 tiles (256x128x128 with
  precise accumulation); elsewhere, or where TMA cannot describe the operands, `_fp8_gemm_kernel`
  (pointer loads, one program per tile). Configurations and the reasons for them: gemm_configs.py.
  16x16x32 tiles under the CPU interpreter.
- "torch":  `torch._scaled_mm` (cuBLASLt / CUTLASS). It needs M, K, N multiples of 16 and bf16 output
  for rowwise scales; other shapes fall back to Triton, fp32 rowwise output is computed in bf16.
- "emulate": dequantize to fp32 and matmul (any device; CPU tests, devices without fp8).
`resolve_backend` maps the config's "auto" to "torch" on CUDA devices with compute capability
>= 8.9 and "triton" otherwise (the Triton interpreter on CPU).

use_fast_accum=False (default) promotes the tensor-core partial sums to the fp32 accumulator after
every 128 K elements (Triton's max_num_imprecise_acc; cuBLAS's promotion interval); True
accumulates the whole K inside the tensor core (faster, less precise; what torchao uses for the
forward output GEMM).
"""

from __future__ import annotations

import torch

from torchtitan_like.kernels.float8.gemm_configs import (
    FAST_CONFIG,
    INTERPRETER_CONFIG,
    POINTER_CONFIG,
    PRECISE_CONFIG,
    GemmConfig,
    sweep_configs,
)
from torchtitan_like.kernels.float8.quantize import new_output, triton, triton_available

if triton is not None:
    import triton.language as tl

BACKENDS = ("auto", "triton", "torch")
PROMOTION_INTERVAL = 128  # precise accumulation: K elements per tensor-core partial sum (4 wgmma k32)

try:  # host-side TMA descriptors (Triton >= 3.4); without them only the pointer kernel runs
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None


if triton is not None:

    @triton.jit
    def _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
        # Grouped ordering: consecutive tiles walk GROUP_M tile rows down one tile column, so the
        # B tiles they share stay in L2 (Triton matmul tutorial).
        num_pid_in_group = GROUP_M * num_pid_n
        first_pid_m = (tile_id // num_pid_in_group) * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + ((tile_id % num_pid_in_group) % group_size_m)
        pid_n = (tile_id % num_pid_in_group) // group_size_m
        return pid_m, pid_n

    @triton.jit
    def _mma(a, b, acc, FAST_ACCUM: tl.constexpr, PROMOTE: tl.constexpr):
        if FAST_ACCUM:
            return tl.dot(a, b, acc)
        return tl.dot(a, b, acc, max_num_imprecise_acc=PROMOTE)

    @triton.jit
    def _scaled(acc, scale_a_ptr, scale_b_ptr, offs_m, offs_n, M, N, ROWWISE: tl.constexpr):
        """The epilogue: dequantization scales applied once to the fp32 accumulator."""
        if ROWWISE:
            scale_a = tl.load(scale_a_ptr + offs_m, mask=offs_m < M, other=0.0)
            scale_b = tl.load(scale_b_ptr + offs_n, mask=offs_n < N, other=0.0)
            return acc * scale_a[:, None] * scale_b[None, :]
        return acc * (tl.load(scale_a_ptr) * tl.load(scale_b_ptr))

    @triton.jit
    def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_a_ptr, scale_b_ptr, M, N, K,
                         stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                         ROWWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PROMOTE: tl.constexpr):
        """Pointer kernel: one program per C tile, masked loads (any shape, stride, device)."""
        pid_m, pid_n = _tile_coords(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows/columns wrap around (valid addresses, no load masks); the store masks them.
        offs_am = offs_m % M
        offs_bn = offs_n % N
        offs_k = tl.arange(0, BLOCK_K)
        # b tile loaded as (BLOCK_K, BLOCK_N) with K contiguous: the K-major B operand fp8 wgmma reads.
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
            acc = _mma(a, b, acc, FAST_ACCUM, PROMOTE)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        c = _scaled(acc, scale_a_ptr, scale_b_ptr, offs_m, offs_n, M, N, ROWWISE).to(c_ptr.dtype.element_ty)
        c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, c, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])

    @triton.jit
    def _fp8_gemm_tma_kernel(a_desc, bt_desc, c_desc, c_ptr, scale_a_ptr, scale_b_ptr, M, N, K, stride_cm,
                             ROWWISE: tl.constexpr, FAST_ACCUM: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                             PROMOTE: tl.constexpr, num_programs, FLATTEN: tl.constexpr,
                             TMA_STORE: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
        """Persistent TMA kernel: each program loops over tiles tile_id = pid, pid + num_programs, ...
        (Triton tutorial 09, persistent matmul). a_desc tiles (BLOCK_M, BLOCK_K) of A, bt_desc tiles
        (BLOCK_N, BLOCK_K) of B^T; both zero-fill out of range, so no masks. C is row-major."""
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        k_tiles = tl.cdiv(K, BLOCK_K)
        num_tiles = num_pid_m * num_pid_n
        for tile_id in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=FLATTEN,
                                warp_specialize=WARP_SPECIALIZE):
            pid_m, pid_n = _tile_coords(tile_id, num_pid_m, num_pid_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for ki in range(k_tiles):
                a = a_desc.load([off_m, ki * BLOCK_K])
                bt = bt_desc.load([off_n, ki * BLOCK_K])
                acc = _mma(a, bt.T, acc, FAST_ACCUM, PROMOTE)
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            c = _scaled(acc, scale_a_ptr, scale_b_ptr, offs_m, offs_n, M, N, ROWWISE).to(c_ptr.dtype.element_ty)
            if TMA_STORE:
                c_desc.store([off_m, off_n], c)
            else:
                c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
                tl.store(c_ptrs, c, mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def _check_operands(a, b, scale_a, scale_b):
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8 gemm needs a (M, K) and b (K, N), got {tuple(a.shape)} and {tuple(b.shape)}")
    rowwise = scale_a.numel() != 1 or scale_b.numel() != 1
    if rowwise and (tuple(scale_a.shape) != (a.shape[0], 1) or tuple(scale_b.shape) != (1, b.shape[1])):
        raise ValueError(f"rowwise scales must be (M, 1) and (1, N), got {tuple(scale_a.shape)}, {tuple(scale_b.shape)}")
    return rowwise


def _tma_ready(a, b, out, config: GemmConfig) -> bool:
    """TMA descriptors need 16-byte aligned bases and row strides, unit inner strides."""
    if config.kernel != "tma" or TensorDescriptor is None:
        return False
    if a.is_cuda and torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return (a.stride(1) == 1 and b.stride(0) == 1 and out.stride(1) == 1 and a.stride(0) % 16 == 0
            and b.stride(1) % 16 == 0 and a.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def _num_programs(device: torch.device, num_tiles: int) -> int:
    if device.type != "cuda":
        return min(num_tiles, 3)  # interpreter: a few programs, so the persistent tile loop runs
    return min(num_tiles, torch.cuda.get_device_properties(device).multi_processor_count)


def _launch(a, b, out, scale_a, scale_b, rowwise: bool, fast: bool, config: GemmConfig) -> None:
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    common = dict(ROWWISE=rowwise, FAST_ACCUM=fast, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=config.group_m,
                  PROMOTE=min(bk, PROMOTION_INTERVAL), num_warps=config.num_warps, num_stages=config.num_stages)
    num_tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if _tma_ready(a, b, out, config):
        # bf16 C only: an fp32 tile would double the shared memory of the store buffer
        tma_store = (config.tma_store and out.element_size() == 2 and (out.stride(0) * 2) % 16 == 0
                     and out.data_ptr() % 16 == 0)
        a_desc = TensorDescriptor.from_tensor(a, [bm, bk])
        bt_desc = TensorDescriptor.from_tensor(b.t(), [bn, bk])
        c_desc = TensorDescriptor.from_tensor(out, [bm, bn]) if tma_store else None
        programs = _num_programs(a.device, num_tiles)
        _fp8_gemm_tma_kernel[(programs,)](a_desc, bt_desc, c_desc, out, scale_a, scale_b, M, N, K, out.stride(0),
                                          num_programs=programs, FLATTEN=config.flatten, TMA_STORE=tma_store,
                                          WARP_SPECIALIZE=config.warp_specialize, **common)
        return
    _fp8_gemm_kernel[(num_tiles,)](a, b, out, scale_a, scale_b, M, N, K, a.stride(0), a.stride(1), b.stride(0),
                                   b.stride(1), out.stride(0), out.stride(1), EVEN_K=K % bk == 0, **common)


_AUTOTUNED: dict[tuple, GemmConfig] = {}


def _autotuned_config(a, b, out, scale_a, scale_b, rowwise: bool, fast: bool) -> GemmConfig:
    """Time every `sweep_configs` candidate once per problem key and keep the fastest."""
    key = (a.shape, b.shape, a.dtype, b.dtype, out.dtype, rowwise, fast)
    if key not in _AUTOTUNED:
        from triton.testing import do_bench

        timings = {}
        for config in sweep_configs(fast):
            try:
                timings[config] = do_bench(lambda: _launch(a, b, out, scale_a, scale_b, rowwise, fast, config),
                                           warmup=5, rep=20)
            except Exception:  # noqa: BLE001  a candidate the installed Triton cannot compile is skipped
                continue
        _AUTOTUNED[key] = min(timings, key=timings.get) if timings else POINTER_CONFIG
    return _AUTOTUNED[key]


def fp8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, use_fast_accum: bool = False,
             out: torch.Tensor | None = None, autotune: bool = False,
             config: GemmConfig | None = None) -> torch.Tensor:
    """Triton C = (a @ b) * scale_a * scale_b; arguments as `torch._scaled_mm` (see module docstring).

    config: a launch configuration (gemm_configs.py); default FAST_CONFIG / PRECISE_CONFIG on CUDA,
    INTERPRETER_CONFIG otherwise; autotune=True (CUDA) times `sweep_configs` once per shape instead.
    The TMA kernel falls back to the pointer kernel where descriptors cannot describe the operands.
    """
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
    chosen = config is not None
    if config is None:
        if not a.is_cuda:
            config = INTERPRETER_CONFIG
        elif autotune:
            config = _autotuned_config(a, b, out, scale_a, scale_b, rowwise, use_fast_accum)
        else:
            config = FAST_CONFIG if use_fast_accum else PRECISE_CONFIG
    if a.is_cuda and config.kernel == "tma" and not _tma_ready(a, b, out, config):
        config = POINTER_CONFIG
    try:
        _launch(a, b, out, scale_a, scale_b, rowwise, use_fast_accum, config)
    except triton.runtime.errors.OutOfResources:
        if chosen or config == POINTER_CONFIG:  # an explicit config must fail loudly (the sweep reports it)
            raise
        _launch(a, b, out, scale_a, scale_b, rowwise, use_fast_accum, POINTER_CONFIG)
    return out


@torch.library.custom_op("torchtitan_like::fp8_scaled_mm", mutates_args=())
def fp8_scaled_mm_op(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                     out_dtype: torch.dtype, use_fast_accum: bool) -> torch.Tensor:
    """`fp8_gemm` as one operator: activation checkpointing's per-op policy can then save its output
    like any matmul's (a raw kernel launch is invisible to it, so it was recomputed), and
    torch.compile sees one node."""
    return fp8_gemm(a, b, scale_a, scale_b, out_dtype, use_fast_accum=use_fast_accum)


@fp8_scaled_mm_op.register_fake
def _(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)


def emulated_scaled_mm(a, b, scale_a, scale_b, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Dequantize to fp32 and matmul: the numerics of fp8 storage without fp8 tensor cores."""
    _check_operands(a, b, scale_a, scale_b)
    product = (a.float() * scale_a.float()) @ (b.float() * scale_b.float())
    # Not a no-op .to(): its alias, returned from Float8Linear's autograd.Function, makes torch
    # 2.11's Dynamo drop the backward (every gradient zero under torch.compile).
    return product if product.dtype == out_dtype else product.to(out_dtype)


def scaled_mm_reference(a, b, scale_a, scale_b) -> torch.Tensor:
    """fp64 product of the dequantized operands (what tests compare every backend with)."""
    return (a.double() * scale_a.double()) @ (b.double() * scale_b.double())


def _torch_scaled_mm(a, b, scale_a, scale_b, out_dtype, use_fast_accum):
    rowwise = _check_operands(a, b, scale_a, scale_b)
    if any(d % 16 for d in (a.shape[0], a.shape[1], b.shape[1])):
        return fp8_scaled_mm_op(a, b, scale_a, scale_b, out_dtype, use_fast_accum)
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
        return fp8_scaled_mm_op(a, b, scale_a, scale_b, out_dtype, use_fast_accum)
    raise ValueError(f"unresolved float8 backend {backend!r}")
