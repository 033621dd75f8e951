"""A run whose FSDP2 weights are all-gathered in fp8 (kernels/float8/fsdp.py wraps them in a tensor
subclass) saves ordinary checkpoints and resumes bit for bit."""

import os
import shutil

from tests.checkpoint.test_resume import final_losses_and_model
from tests.helpers import launch, tiny_overrides

LAUNCH_TIMEOUT_SECONDS = 240
FLOAT8_ALL_GATHER = ["--parallelism.data_parallel_shard_degree", "2", "--float8.enable", "true",
                     "--float8.emulate", "true", "--float8.enable_fsdp_float8_all_gather", "true",
                     "--float8.precompute_float8_dynamic_scale_for_fsdp", "true"]


def _train(dump: str) -> str:
    args = [*tiny_overrides(dump, steps=4), "--metrics.enable_tensorboard", "false", "--training.device", "cpu",
            "--checkpoint.enable", "true", "--checkpoint.interval", "2", "--checkpoint.last_save_model_only", "false",
            *FLOAT8_ALL_GATHER]
    return launch(["-m", "torchtitan_like.train", *args], 2, LAUNCH_TIMEOUT_SECONDS, fork=True)


def test_fp8_all_gather_run_resumes_from_its_checkpoint_bitwise(tmp_path):
    straight = str(tmp_path / "straight")
    _train(straight)
    resumed = str(tmp_path / "resumed")
    shutil.copytree(straight, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoint", "step-4"))
    output = _train(resumed)
    assert "resumed from step 2" in output
    # read_section loads without pickles: it fails if the subclass leaked into the checkpoint
    losses, model = final_losses_and_model(resumed, 4)
    expected_losses, expected_model = final_losses_and_model(straight, 4)
    assert losses == expected_losses
    assert model.keys() == expected_model.keys()
    for name, value in expected_model.items():
        assert value.equal(model[name]), name
