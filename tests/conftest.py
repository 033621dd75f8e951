"""Session-wide test settings.

Triton reads TRITON_INTERPRET when a kernel is first compiled, and some module (torch.compile,
the kernels package) may import triton before the kernel tests run: set it once, first, so every
Triton kernel runs on the CPU interpreter in the test session (and in its subprocesses).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    """Subprocesses (torchrun's log folders and error files, Inductor's cache) write their temporary
    files into one folder of this session, removed at its end, instead of leaving them in /tmp."""
    import tempfile

    config._subprocess_tmp = tempfile.mkdtemp(prefix="torchtitan_like-tests-")  # in /tmp: gettempdir() caches it
    os.environ["TMPDIR"] = config._subprocess_tmp


def pytest_unconfigure(config):
    import shutil

    folder = getattr(config, "_subprocess_tmp", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
