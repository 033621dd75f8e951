"""Command-line entry point: `python -m torchtitan_like.train --config FILE [--section.key value ...]`.

User mistakes (bad config, missing files, bad data) print one `error:` line and exit with code 2,
without a traceback; `--print-config` prints the resolved config and exits. `--check-config` runs
every start-up check of the Trainer (startup.check_user_inputs) for a run of WORLD_SIZE processes
in this one process, and whether the checkpoint the run would load fits the config (checkpoint/
startup_fit.py: model shapes and tying, data position; metadata only), and exits 0 or 2 without
creating a process group or a real model: the launchers run it before torchrun, so that a mistake
is reported once, with exit code 2. A preemption signal
(SIGTERM, SIGUSR1) saves a checkpoint and exits with code 75 (see preemption.py).
"""

from __future__ import annotations

import sys

from torchtitan_like.config import load_config, to_toml
from torchtitan_like.errors import USER_ERROR_EXIT_CODE, UserError
from torchtitan_like.logging import init_logger
from torchtitan_like.preemption import PREEMPTED_EXIT_CODE, Preempted

USAGE = """usage: python -m torchtitan_like.train [--config FILE.toml] [--print-config] [--check-config]
                                     [--section.key VALUE ...]

Trains the model described by a TOML config (see train_configs/ and docs/config.md).
Overrides: --training.steps 100, --training.steps=100, --compile.enable (a bare flag means true).
--print-config prints the resolved config and exits.
--check-config checks the config for a run of $WORLD_SIZE processes (default 1) and exits 0 or 2,
starting nothing (run_train.sh and multinode_trainer.slurm run it before torchrun).
"""


def check_config(config) -> None:
    """The Trainer's start-up checks, in this process only, and whether the checkpoint the run
    would load fits its config (which the Trainer finds only at the load): what `--check-config` runs."""
    from torchtitan_like.checkpoint.startup_fit import check_checkpoint_fits
    from torchtitan_like.distributed.setup import world_info
    from torchtitan_like.startup import check_user_inputs

    _, _, world_size = world_info()
    checked = check_user_inputs(config, world_size)
    loads = check_checkpoint_fits(config, checked)
    mesh = " x ".join(f"{name} {size}" for name, size in checked.parallel_dims.mesh_shape()) or "none"
    print(f"config OK for {world_size} process{'es' if world_size > 1 else ''}: {config.model.name} "
          f"{config.model.flavor}, mesh {mesh}, grad accumulation {checked.grad_accum_steps}, "
          f"device {checked.device.type}" + (f"; checkpoint {loads.folder.path} fits" if loads else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    init_logger()
    trainer = None
    try:
        config, print_config = load_config([arg for arg in argv if arg != "--check-config"])
        if "--check-config" in argv:
            check_config(config)
            return 0
        if print_config:
            print(to_toml(config))
            if "--print-config" in argv:
                return 0
        from torchtitan_like.trainer import Trainer

        trainer = Trainer(config)
        trainer.train()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except Preempted as stop:
        print(str(stop), file=sys.stderr, flush=True)
        return PREEMPTED_EXIT_CODE
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
