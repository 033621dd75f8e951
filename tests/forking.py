"""Start the processes of a test by forking one interpreter that imported torch and the trainer once.

A fresh `python -m torchtitan_like.train` or torchrun rank spends about 4 s of CPU importing torch,
DTensor, dynamo, DCP and the trainer before it does anything; a start-up check then takes 10 ms and a
tiny parity run a second or two, so on a 2-core CI machine the imports are most of many tests. Here a
server process (`python -m tests.forking ...`) imports the modules of `PRELOAD` once and forks a
child per process the test needs. A child is a copy of that interpreter: it takes its environment
variables, runs its target as `python -m MODULE` or `python SCRIPT` would (runpy, `__main__`,
`sys.argv`, the script's folder first on `sys.path`) and exits with the code the interpreter would
give it: the argument of `sys.exit`, or 1 after printing the traceback of an uncaught exception. It
runs the atexit handlers, flushes its output and leaves by `os._exit`: the interpreter's own teardown
of torch's modules costs a forked child 1.5 s of copy-on-write for nothing a test observes.

- `run_cli_cases`: many invocations of a CLI (e.g. invalid configs that must exit 2), each with its
  own output, exit code and timeout.
- `launch_ranks_command`: a stand-in for `torchrun --nproc-per-node N`, run by
  tests.helpers.launch(..., fork=True) under its timeout: every rank gets torchrun's RANK,
  LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT and rendezvouses through
  env:// as under torchrun; when a rank fails, the others are killed and the launch fails, as
  torchrun's does.

What a forked child does not re-check is that the module imports cleanly in a fresh interpreter, nor
torchrun itself: the tests of those (the README command, --print-config, torchrun --max-restarts,
run_train.sh) keep starting real processes.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the trainer and everything it imports (torch, DTensor, dynamo, DCP, pipelining): the bulk of start-up
PRELOAD = ("torchtitan_like.trainer",)


@dataclass
class CaseResult:
    returncode: int | None  # None: killed after the case timeout; negative: killed by that signal
    stdout: str
    stderr: str


def run_cli_cases(cases: dict[str, dict], case_timeout: float, module: str = "torchtitan_like.train",
                  parallel: int = 2) -> dict[str, CaseResult]:
    """Run `python -m module args` for every case {name: {"args": [...], "env": {...}, "cwd": DIR}}
    ("env" adds to this process's environment; "cwd" defaults to the repository root), `parallel` at
    a time, each killed after `case_timeout` seconds. Returns {name: CaseResult}."""
    with tempfile.TemporaryDirectory(prefix="cli_cases_") as out_dir:
        spec_path = os.path.join(out_dir, "spec.json")
        with open(spec_path, "w") as handle:
            json.dump({"module": module, "case_timeout": case_timeout, "parallel": parallel, "out_dir": out_dir,
                       "cases": {name: {"args": list(case["args"]), "env": dict(case.get("env", {})),
                                        "cwd": case.get("cwd", REPO_ROOT)} for name, case in cases.items()}},
                      handle)
        # the batch's limit: the imports once, then every case at its timeout, `parallel` at a time
        total_timeout = 120 + case_timeout * -(-len(cases) // parallel)
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen([sys.executable, "-m", "tests.forking", "cases", spec_path], cwd=REPO_ROOT,
                                  env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, start_new_session=True)
        from tests.helpers import communicate_or_kill

        output = communicate_or_kill(server, total_timeout, "CLI case server")
        assert server.returncode == 0, f"CLI case server failed ({server.returncode}):\n{output[-6000:]}"
        with open(os.path.join(out_dir, "results.json")) as handle:
            returncodes = json.load(handle)
        results = {}
        for index, name in enumerate(cases):
            with open(os.path.join(out_dir, f"{index}.stdout"), errors="replace") as out, \
                    open(os.path.join(out_dir, f"{index}.stderr"), errors="replace") as err:
                results[name] = CaseResult(returncodes[name], out.read(), err.read())
        return results


def launch_ranks_command(target: list[str], nproc: int, master_port: int) -> list[str]:
    """The command that runs `target` (["-m", module, args...] or [script, args...]) on `nproc` forked
    ranks; see tests.helpers.launch, which runs it under a timeout."""
    return [sys.executable, "-m", "tests.forking", "ranks", str(nproc), str(master_port), *target]


def _run_as_main(target: list[str]) -> int:
    """In a forked child: run `python -m MODULE ARGS` or `python SCRIPT ARGS`; the exit code it would have."""
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]  # runpy puts the module's path in argv[0]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path[0] = os.path.dirname(os.path.abspath(target[0]))
            runpy.run_path(target[0], run_name="__main__")
        code = 0
    except SystemExit as stop:  # as the interpreter reads sys.exit's argument
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: its traceback, then exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    return code


def _fork(env: dict[str, str], target: list[str], output_paths: tuple[str, str] | None = None) -> int:
    """Fork a child that runs `target` with `env` added to its environment (stdout and stderr to
    `output_paths` when given) and exits; returns its pid to the parent."""
    assert not (target[0] == "-m" and target[1] in sys.modules), "runpy warns when its module was imported before"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.environ.update(env)
        if output_paths:
            for fd, path in zip((1, 2), output_paths):
                handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(handle, fd)
                os.close(handle)
        code = _run_as_main(target)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # never back into the server's loop


def _serve_cases(spec_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    pending = list(enumerate(spec["cases"].items()))
    running: dict[int, tuple[str, float]] = {}  # pid -> (case name, deadline)
    returncodes: dict[str, int | None] = {}
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            index, (name, case) = pending.pop(0)
            os.chdir(case["cwd"])  # inherited by the child
            paths = (os.path.join(spec["out_dir"], f"{index}.stdout"), os.path.join(spec["out_dir"], f"{index}.stderr"))
            pid = _fork(case["env"], ["-m", spec["module"], *case["args"]], paths)
            running[pid] = (name, time.monotonic() + spec["case_timeout"])
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in running:
            returncodes[running.pop(pid)[0]] = os.waitstatus_to_exitcode(status)
            continue
        now = time.monotonic()
        for pid, (name, deadline) in list(running.items()):
            if now > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                running.pop(pid)
                returncodes[name] = None
        time.sleep(0.01)
    with open(os.path.join(spec["out_dir"], "results.json"), "w") as handle:
        json.dump(returncodes, handle)


def _serve_ranks(nproc: int, master_port: str, target: list[str]) -> int:
    ranks = {}
    for rank in range(nproc):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": master_port}
        ranks[_fork(env, target)] = rank
    while ranks:
        pid, status = os.wait()
        rank, code = ranks.pop(pid), os.waitstatus_to_exitcode(status)
        if code != 0:  # as torchrun: one failed rank stops the job
            for other in ranks:
                os.kill(other, signal.SIGKILL)
            print(f"tests.forking: rank {rank} exited with code {code}; killed the other ranks", flush=True)
            return 1
    return 0


if __name__ == "__main__":
    for module in PRELOAD:
        importlib.import_module(module)
    if sys.argv[1] == "cases":
        _serve_cases(sys.argv[2])
    else:
        sys.exit(_serve_ranks(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
