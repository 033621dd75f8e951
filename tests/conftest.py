"""Session-wide test settings.

Triton reads TRITON_INTERPRET when a kernel is first compiled, and some module (torch.compile,
the kernels package) may import triton before the kernel tests run: set it once, first, so every
Triton kernel runs on the CPU interpreter in the test session (and in its subprocesses).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
