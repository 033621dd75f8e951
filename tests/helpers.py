"""Shared test helpers: run the CLI as a subprocess, and run a function on N gloo ranks with a timeout."""

from __future__ import annotations

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
