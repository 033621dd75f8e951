"""Shared test helpers: run the CLI as a subprocess, and run a function on N gloo ranks with a timeout."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(args: list[str], timeout: float = 120, env: dict | None = None, cwd: str | None = None,
            module: str = "torchtitan_like.train") -> subprocess.CompletedProcess:
    """Run `python -m <module> args...` and capture its output; fails the test on a hang."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd or REPO_ROOT)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_overrides(dump_folder: str, steps: int = 5) -> list[str]:
    """CLI overrides for a very small, fast debug run on the built-in corpus."""
    return ["--config", os.path.join(REPO_ROOT, "train_configs", "debug_model.toml"),
            "--job.dump_folder", dump_folder, "--training.steps", str(steps), "--training.seq_len", "32",
            "--training.local_batch_size", "2", "--lr_scheduler.warmup_steps", "1", "--validation.enable", "false",
            "--metrics.log_freq", "1"]


def launch(target: list[str], nproc: int, timeout: float, fork: bool = False) -> str:
    """Run `target` (e.g. ["-m", "torchtitan_like.train", ...] or [script, args...]) on one process,
    or on `nproc` gloo ranks under torchrun; return its output. A hang kills the launcher and every
    rank it started, and fails the test, as does a non-zero exit.

    fork=True forks the ranks from one interpreter that imported torch and the trainer once, with
    torchrun's environment (tests/forking.py), for tests about what the ranks compute rather than
    about torchrun: it saves each rank about 4 s of CPU imports."""
    if fork:
        from tests.forking import launch_ranks_command

        command = launch_ranks_command(target, nproc, free_port())
    elif nproc == 1:
        command = [sys.executable, *target]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                   "127.0.0.1", "--master-port", str(free_port()), *target]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=REPO_ROOT, start_new_session=True)
    output = communicate_or_kill(process, timeout, f"{nproc}-process launch")
    assert process.returncode == 0, f"{nproc}-process launch failed ({process.returncode}):\n{output[-6000:]}"
    return output


def communicate_or_kill(process: subprocess.Popen, timeout: float, what: str) -> str:
    """The output of `process` (started with start_new_session=True and stdout piped); after
    `timeout` seconds its whole process group is killed and the test fails, naming `what`."""
    import signal

    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        raise AssertionError(f"{what} timed out after {timeout}s:\n{output[-4000:]}")
    return output


class FileOnAFullDisk:
    """A file opened on a disk with `room["bytes"]` left (one dict shared by every file of that disk):
    the write that reaches past it writes what fits and raises ENOSPC without a file name, as the
    kernel's write(2) does. Anything else goes to the real file."""

    def __init__(self, file, room: dict):
        self._file, self._room = file, room

    def write(self, data):
        fits = min(len(data), self._room["bytes"])
        self._file.write(bytes(memoryview(data)[:fits]))
        self._room["bytes"] -= fits
        if fits < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)
