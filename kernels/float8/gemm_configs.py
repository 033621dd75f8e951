"""Launch configurations of the Triton FP8 GEMM (gemm.py): the defaults, the benchmark sweep, the
interpreter's small tiles.

Two kernels (gemm.py):
- "tma": persistent (one program per SM, grouped tile order) with TMA tensor-descriptor loads of A
  (M, K) and of B^T (N, K), both K-major as Hopper's fp8 wgmma needs; the descriptors zero-fill
  out-of-range rows and K tails, so the loop has no masks. Needs `triton.tools.tensor_descriptor`
  and 16-byte aligned rows (K % 16 == 0).
- "pointer": one program per tile, cp.async pointer loads with masks; any shape, any device.

Registers bound the tiles. fast accumulation (use_fast_accum=True) keeps one fp32 accumulator:
128x256 with 8 warps is 128 registers per thread for it (186 in all on sm_90, no spills).
Precise accumulation (max_num_imprecise_acc=128) also keeps a partial accumulator per wgmma
instruction tile: 128x256 spills (the m64n256 partial is another 128 registers); 256x128 with
8 warps issues m64n128 and fits in 254 registers without spills.

Shared memory per stage: (BLOCK_M + BLOCK_N) * BLOCK_K bytes (48 KiB at 128x256x128); a TMA store
adds BLOCK_M * BLOCK_N * 2 bytes (bf16) for the output tile. The sm_90 limit is 227 KiB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of the FP8 GEMM."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3
    kernel: str = "tma"  # "tma" (persistent, tensor descriptors) or "pointer"
    flatten: bool = True  # tma: flatten the tile and K loops, so the next tile's loads overlap the epilogue
    tma_store: bool = False  # tma: write C through a descriptor (row-major C only) instead of vector stores
    warp_specialize: bool = False  # tma: producer/consumer warps (Triton's tl.range(warp_specialize=))

    @property
    def name(self) -> str:
        extra = "".join(f"+{flag}" for flag in ("flatten", "tma_store", "warp_specialize") if getattr(self, flag))
        return (f"{self.kernel} {self.block_m}x{self.block_n}x{self.block_k} g{self.group_m} "
                f"w{self.num_warps} s{self.num_stages}{extra if self.kernel == 'tma' else ''}")


# Defaults on CUDA (predictions from the sm_90 resource report; the benchmark sweep checks them).
# 3 stages, not 4: with the flattened loop 4 stages take 224 of the 227 KiB, too close to the limit
# for another Triton version; 3 stages (176 KiB) keep two 48 KiB loads in flight behind the wgmma.
FAST_CONFIG = GemmConfig(128, 256, 128, num_stages=3)
PRECISE_CONFIG = GemmConfig(256, 128, 128, num_stages=3)
# The previous default (the measured Llama shapes at 60-65% of _scaled_mm): the pointer fallback.
POINTER_CONFIG = GemmConfig(128, 128, 128, num_stages=4, kernel="pointer")

# Small tiles for the CPU interpreter (TRITON_INTERPRET=1), where time goes with the element count.
INTERPRETER_CONFIG = GemmConfig(16, 16, 32, group_m=2, num_warps=1, num_stages=1, kernel="pointer")
INTERPRETER_TMA_CONFIG = replace(INTERPRETER_CONFIG, kernel="tma")


def sweep_configs(use_fast_accum: bool) -> list[GemmConfig]:
    """At most 8 candidates the benchmark times (and `fp8_gemm(autotune=True)` picks from)."""
    tile = (128, 256, 128) if use_fast_accum else (256, 128, 128)
    other = (256, 128, 128) if use_fast_accum else (128, 256, 128)  # precise 128x256 spills: a control
    return [
        GemmConfig(*tile, num_stages=3),  # the default
        GemmConfig(*tile, num_stages=4),
        GemmConfig(*tile, num_stages=3, tma_store=True),
        GemmConfig(*tile, num_stages=4, flatten=False),
        GemmConfig(*tile, num_stages=3, warp_specialize=True),
        GemmConfig(*other, num_stages=3),
        GemmConfig(128, 128, 128, num_stages=4),
        POINTER_CONFIG,
    ]
