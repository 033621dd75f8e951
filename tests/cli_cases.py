"""Run many start-up checks of a command-line module from one interpreter that imported it once.

Each `python -m torchtitan_like.train ...` spends about 4 s of CPU starting Python and importing torch
and the trainer, then a fraction of a second validating its config; a test of many invalid configs
(exit 2 and a message) is almost all imports. `run_cli_cases` starts one server process
(`python -m tests.cli_cases SPEC`) that imports the modules named in `preload` once and forks a child
per case. Each child is a copy of that interpreter: it takes the case's environment variables and
working directory, writes to its own stdout and stderr files, runs the module as `python -m` does
(runpy, `__main__`, `sys.argv`), and exits with the code the interpreter would give it: the argument
of `sys.exit(main())`, or 1 after printing the traceback of an uncaught exception. It then runs the
atexit handlers, flushes its output and leaves by `os._exit`: the interpreter's own teardown of
torch's modules costs a forked child 1.5 s of copy-on-write for nothing a test can observe.
Every case has its own timeout (the child is killed and its returncode is None) and the server one
for the whole batch.

What a forked child does not re-check is that the module imports cleanly in a fresh interpreter:
keep at least one ordinary `run_cli` test of the same command for that.
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

from tests.helpers import REPO_ROOT

# the trainer and everything it imports (torch, DTensor, dynamo, DCP): the bulk of start-up
DEFAULT_PRELOAD = ("torchtitan_like.trainer",)


@dataclass
class CaseResult:
    returncode: int | None  # None: killed after the case timeout; negative: killed by that signal
    stdout: str
    stderr: str


def run_cli_cases(cases: dict[str, dict], case_timeout: float, module: str = "torchtitan_like.train",
                  preload: tuple[str, ...] = DEFAULT_PRELOAD, parallel: int = 2) -> dict[str, CaseResult]:
    """Run `python -m module args` for every case {name: {"args": [...], "env": {...}, "cwd": DIR}}
    ("env" adds to this process's environment; "cwd" defaults to the repository root), `parallel` at
    a time, each killed after `case_timeout` seconds. Returns {name: CaseResult}."""
    assert module not in preload, "runpy warns when the module it runs was imported before"
    with tempfile.TemporaryDirectory(prefix="cli_cases_") as out_dir:
        spec_path = os.path.join(out_dir, "spec.json")
        with open(spec_path, "w") as handle:
            json.dump({"module": module, "preload": list(preload), "case_timeout": case_timeout,
                       "parallel": parallel, "out_dir": out_dir,
                       "cases": {name: {"args": list(case["args"]), "env": dict(case.get("env", {})),
                                        "cwd": case.get("cwd", REPO_ROOT)} for name, case in cases.items()}},
                      handle)
        # the batch's limit: the imports once, then every case at its timeout, `parallel` at a time
        total_timeout = 120 + case_timeout * -(-len(cases) // parallel)
        env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONUNBUFFERED": "1"}
        server = subprocess.Popen([sys.executable, "-m", "tests.cli_cases", spec_path], cwd=REPO_ROOT, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, start_new_session=True)
        try:
            output, _ = server.communicate(timeout=total_timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            output, _ = server.communicate()
            raise AssertionError(f"CLI case server timed out after {total_timeout}s:\n{output[-4000:]}")
        assert server.returncode == 0, f"CLI case server failed ({server.returncode}):\n{output[-6000:]}"
        with open(os.path.join(out_dir, "results.json")) as handle:
            returncodes = json.load(handle)
        results = {}
        for index, name in enumerate(cases):
            with open(os.path.join(out_dir, f"{index}.stdout"), errors="replace") as out, \
                    open(os.path.join(out_dir, f"{index}.stderr"), errors="replace") as err:
                results[name] = CaseResult(returncodes[name], out.read(), err.read())
        return results


def _run_case(module: str, case: dict, stdout_path: str, stderr_path: str) -> int:
    """In the forked child: run `python -m module args` and return the exit code the interpreter would."""
    os.environ.update(case["env"])
    os.chdir(case["cwd"])
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    sys.argv = [module, *case["args"]]  # runpy puts the module's path in argv[0]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as stop:  # as the interpreter reads sys.exit's argument
        if stop.code is None or isinstance(stop.code, int):
            code = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - an uncaught exception: traceback, exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    atexit._run_exitfuncs()
    return code


def _serve(spec_path: str) -> None:
    with open(spec_path) as handle:
        spec = json.load(handle)
    for name in spec["preload"]:
        importlib.import_module(name)
    names = list(spec["cases"])
    pending = list(enumerate(names))
    running: dict[int, tuple[str, float]] = {}  # pid -> (case name, deadline)
    returncodes: dict[str, int | None] = {}
    while pending or running:
        while pending and len(running) < spec["parallel"]:
            index, name = pending.pop(0)
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _run_case(spec["module"], spec["cases"][name],
                                     os.path.join(spec["out_dir"], f"{index}.stdout"),
                                     os.path.join(spec["out_dir"], f"{index}.stderr"))
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)  # never back into the server's loop
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


if __name__ == "__main__":
    _serve(sys.argv[1])
