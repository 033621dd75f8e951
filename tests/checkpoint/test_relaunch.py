"""A run relaunched with a changed config: what changed is logged, settings that keep the
checkpoint's meaning continue it, and one that cannot (another seq_len) stops with exit 2 before
the run's config.toml or any checkpoint is written. The table in docs/checkpoint.md
("Relaunching with a changed config") lists every case."""

import os
import shutil

from tests.checkpoint.test_resume import read_section, run_args
from tests.forking import run_cli_cases


def _overridden(args: list[str], **changes) -> list[str]:
    """`args` with `--section.key value` replaced or added for each `section__key=value`."""
    args = list(args)
    for name, value in changes.items():
        flag = "--" + name.replace("__", ".")
        if flag in args:
            args[args.index(flag) + 1] = str(value)
        else:
            args += [flag, str(value)]
    return args


def test_a_relaunch_logs_what_changed_continues_or_refuses_before_writing(tmp_path):
    base = str(tmp_path / "base")
    first = run_cli_cases({"base": {"args": run_args(base, steps=4, interval=2)}}, case_timeout=120)["base"]
    assert first.returncode == 0, first.stderr[-3000:]
    with open(os.path.join(base, "config.toml")) as handle:
        base_config = handle.read()
    dumps = {name: str(tmp_path / name) for name in ("changed", "lowered", "seq_len")}
    for dump in dumps.values():
        shutil.copytree(base, dump)
    results = run_cli_cases({
        "changed": {"args": _overridden(run_args(dumps["changed"], steps=6, interval=2),
                                        training__local_batch_size=4, lr_scheduler__warmup_steps=3)},
        "lowered": {"args": _overridden(run_args(dumps["lowered"], steps=3, interval=2),
                                        metrics__enable_tensorboard="true")},
        "seq_len": {"args": _overridden(run_args(dumps["seq_len"], steps=6, interval=2), training__seq_len=64,
                                        metrics__enable_tensorboard="true")},
    }, case_timeout=120)

    changed = results["changed"]
    assert changed.returncode == 0, changed.stderr[-3000:]
    note = "config changed since this run's last launch: "
    for change in ("training.local_batch_size: 2 -> 4", "lr_scheduler.warmup_steps: 1 -> 3", "training.steps: 4 -> 6"):
        assert note + change in changed.stdout
    assert "LR schedule changed on resume (training.steps or [lr_scheduler]): step 5 uses " in changed.stdout
    # tokens_seen counts what was read: 4 steps of 2 x 32, then 2 of 4 x 32
    train_state = read_section(os.path.join(dumps["changed"], "checkpoint", "step-6"), "train_state")
    assert int(train_state["tokens_seen"]) == 4 * 2 * 32 + 2 * 4 * 32

    lowered = results["lowered"]
    assert lowered.returncode == 0, lowered.stderr[-3000:]
    assert "nothing to train (a lower training.steps does not roll the run back" in lowered.stdout
    assert "checkpoint.load_step" in lowered.stdout
    assert sorted(os.listdir(os.path.join(dumps["lowered"], "checkpoint"))) == ["step-2", "step-4"]
    assert not os.path.exists(os.path.join(dumps["lowered"], "tb"))  # no empty events file for a run that ran nothing

    refused = results["seq_len"]
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "seq_len=32, but this run has seq_len=64 (training.seq_len)" in refused.stderr
    assert 'add "dataloader" to checkpoint.exclude_from_loading' in refused.stderr
    assert sorted(os.listdir(os.path.join(dumps["seq_len"], "checkpoint"))) == ["step-2", "step-4"]
    with open(os.path.join(dumps["seq_len"], "config.toml")) as handle:
        assert handle.read() == base_config  # the copy of the checkpointed run's, not rewritten
    assert not os.path.exists(os.path.join(dumps["seq_len"], "tb"))
