"""`torch.compile` per transformer block (TorchTitan's granularity).

Compiling each block separately keeps compile time flat in depth (identical blocks reuse one
graph), leaves FSDP's per-block hooks outside the graphs, and composes with activation
checkpointing (the checkpointed block is compiled, so recomputation is compiled too).
`Module.compile()` compiles in place, so parameter names gain no `_orig_mod.` prefix.
"""

from __future__ import annotations

from torch import nn


def apply_compile(blocks: nn.ModuleDict, backend: str) -> None:
    """Compile every block of `blocks` in place; `fullgraph=True` so a graph break is an error
    rather than a silent slowdown."""
    for block in blocks.values():
        block.compile(backend=backend, fullgraph=True)
