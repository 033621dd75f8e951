"""Launch heuristics for the RMSNorm kernels in `kernels/rmsnorm.py`, and overrides for tuning sweeps.

The kernels are memory bound; a config is good when each SM keeps enough bytes in flight (~32-64 KiB
on an H100/H200) without register spills. Numbers below come from compiling the kernels for sm_90
(registers per thread, shared memory) and the occupancy that follows; `benchmarks/bench_rmsnorm.py
--sweep` times the neighbours of each default on a GPU.

Forward: one program per BLOCK_M rows; short, many programs (high occupancy hides latency).

Backward: a single wave of `programs_per_sm * SMs` programs, each owning a contiguous run of rows and
walking it BLOCK_M rows at a time through `tl.range(num_stages=...)`, which on sm_80+ turns the x and
dy loads into cp.async copies into shared memory issued `num_stages - 1` tiles ahead. Each program
keeps dw as a (BLOCK_N,) fp32 vector and writes one partial row; a second small kernel sums them.

Overrides (benchmark sweeps, experiments): the environment variable TORCHTITAN_RMSNORM_LAUNCH, e.g.
`bwd_warps=16,bwd_stages=2`, or `with launch_overrides(bwd_programs_per_sm=2): ...` in Python. Keys:
fwd_block_m, fwd_warps, bwd_block_m, bwd_warps, bwd_stages, bwd_programs_per_sm.
"""

import contextlib
import dataclasses
import os

ENV_VAR = "TORCHTITAN_RMSNORM_LAUNCH"
OVERRIDE_KEYS = ("fwd_block_m", "fwd_warps", "bwd_block_m", "bwd_warps", "bwd_stages", "bwd_programs_per_sm")
_context_overrides: dict = {}


@dataclasses.dataclass(frozen=True)
class ForwardLaunch:
    block_m: int  # rows per program
    block_n: int  # next power of two >= hidden size: a row is one masked vector
    num_warps: int


@dataclasses.dataclass(frozen=True)
class BackwardLaunch:
    block_m: int  # rows per loop iteration (tile)
    block_n: int
    num_warps: int
    num_stages: int  # tiles whose loads are in flight at once (1: no software pipelining)
    programs_per_sm: int  # resident programs per SM the grid is sized for (one wave)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _overrides() -> dict:
    values = {}
    for item in filter(None, (part.strip() for part in os.environ.get(ENV_VAR, "").split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in OVERRIDE_KEYS or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"{ENV_VAR}: bad item {item!r}; expected key=positive int with key in {OVERRIDE_KEYS}")
        values[key.strip()] = int(value)
    values.update(_context_overrides)
    return values


@contextlib.contextmanager
def launch_overrides(**values: int):
    """Temporarily replace fields of the launch heuristics (keys as in OVERRIDE_KEYS)."""
    unknown = set(values) - set(OVERRIDE_KEYS)
    if unknown:
        raise ValueError(f"launch_overrides: unknown keys {sorted(unknown)}; allowed {OVERRIDE_KEYS}")
    saved = dict(_context_overrides)
    _context_overrides.update(values)
    try:
        yield
    finally:
        _context_overrides.clear()
        _context_overrides.update(saved)


def forward_launch(n_cols: int) -> ForwardLaunch:
    """~4096 elements per program (2 rows at 2048, 1 row from 4096), 16 elements per thread at most
    (sm_90: 37-62 registers, no spills, so up to 8 programs per SM each with its loads in flight)."""
    block_n = max(16, _next_power_of_2(n_cols))
    block_m = min(16, max(1, 4096 // block_n))
    elements = block_m * block_n
    num_warps = 32 if elements >= 32768 else 16 if elements >= 8192 else 8 if elements >= 2048 else 4
    values = _overrides()
    return ForwardLaunch(values.get("fwd_block_m", block_m), block_n, values.get("fwd_warps", num_warps))


def backward_launch(n_cols: int) -> BackwardLaunch:
    """Per hidden size, from the sm_90 compile (bf16, registers per thread; see the benchmark):

    - <= 4096 elements per row: tiles of ~4096 elements, 8 warps, 3 stages (~107 registers, 41-49
      KiB shared memory): 2 programs per SM, each with 2 tiles (32 KiB) of loads in flight.
    - 8192: 1 row, 16 warps, 3 stages (103 registers, 96 KiB): 1 program per SM, 64 KiB in flight.
    - 16384: 1 row, 16 warps, 3 stages (128 registers with a few spills): 1 program per SM. On the
      H200 (2026-11-27 sweep) 3 stages moved 3,131 GB/s in the backward against 2,828 with 2. The
      residual variant (a third input) then needs 262,216 bytes of shared memory, over the H200's
      232,448: `rmsnorm._backward` retries a launch the device refuses with fewer stages.
    - above 16384: 32 warps, 2 stages (shared memory).
    """
    block_n = max(16, _next_power_of_2(n_cols))
    block_m = min(64, max(1, 4096 // block_n))
    if block_n <= 4096:
        num_warps, num_stages, programs_per_sm = (8 if block_m * block_n >= 2048 else 4), 3, 2
    elif block_n <= 8192:
        num_warps, num_stages, programs_per_sm = 16, 3, 1
    else:
        num_warps, num_stages, programs_per_sm = (16, 3, 1) if block_n <= 16384 else (32, 2, 1)
    values = _overrides()
    return BackwardLaunch(values.get("bwd_block_m", block_m), block_n, values.get("bwd_warps", num_warps),
                          values.get("bwd_stages", num_stages), values.get("bwd_programs_per_sm", programs_per_sm))


def backward_grid(n_rows: int, launch: BackwardLaunch, sm_count: int) -> tuple[int, int]:
    """(programs, rows per program): one wave of programs_per_sm * SMs programs, each owning a
    multiple of BLOCK_M rows; fewer programs when there are fewer tiles than that."""
    n_tiles = -(-n_rows // launch.block_m)
    wanted = max(1, min(n_tiles, sm_count * launch.programs_per_sm))
    rows_per_program = -(-n_tiles // wanted) * launch.block_m
    return -(-n_rows // rows_per_program), rows_per_program
