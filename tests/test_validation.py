"""Validation: every evaluation scores the same first `validation.steps` batches of the split."""

import time

import pytest
import torch

from tests.helpers import tiny_overrides
from torchtitan_like.config import load_config
from torchtitan_like.trainer import Trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    config, _ = load_config(tiny_overrides(str(tmp_path_factory.mktemp("validation")), steps=2) + [
        "--validation.enable", "true", "--validation.steps", "3", "--validation.local_batch_size", "2",
        "--metrics.enable_tensorboard", "false"])
    trainer = Trainer(config)
    yield trainer
    trainer.close()


def test_repeated_evaluations_of_the_same_weights_agree(trainer):
    first = trainer.validate()
    assert [trainer.validate(), trainer.validate()] == [first, first]
    # Exactly validation.steps batches were read, none fetched and dropped.
    assert trainer.val_dataloader.sampler.yielded_in_epoch == 3 * 2


def test_validation_time_is_left_out_of_the_next_training_log_line(trainer):
    window_start = trainer.metrics.window_start
    before = time.perf_counter()
    trainer.validate()
    after = time.perf_counter()
    # The window of the next log line (tokens/s, MFU, data share) starts later by the validation's time.
    assert 0 < trainer.metrics.window_start - window_start <= after - before


def test_evaluation_leaves_training_untouched(trainer):
    # A run with validation must train exactly as one without: same data position, same RNG, the
    # model back in train mode, and no gradients left behind for the next step to add to.
    data_position = trainer.dataloader.state_dict()
    rng_state = torch.get_rng_state()
    trainer.validate()
    assert trainer.dataloader.state_dict() == data_position
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert all(part.training for part in trainer.model_parts)
    assert all(param.grad is None for part in trainer.model_parts for param in part.parameters())
    assert torch.is_grad_enabled()


def test_only_the_first_validation_of_a_run_gets_the_start_up_timeout(tmp_path, monkeypatch):
    # It compiles the forward-only graphs (under PP the stages one after another), as step 1 does.
    import contextlib

    import torchtitan_like.trainer as trainer_module

    events = []

    @contextlib.contextmanager
    def recording_startup_timeout(comm, mesh):
        events.append("start-up timeout")
        yield
        events.append("training timeout")

    monkeypatch.setattr(trainer_module, "startup_timeout", recording_startup_timeout)
    config, _ = load_config(tiny_overrides(str(tmp_path), steps=3) + [
        "--validation.enable", "true", "--validation.steps", "1", "--validation.local_batch_size", "2",
        "--validation.freq", "1", "--metrics.enable_tensorboard", "false"])
    run = Trainer(config)
    monkeypatch.setattr(run, "validate", lambda: events.append("validate") or 1.0)
    try:
        run.train()
    finally:
        run.close()
    assert events == ["start-up timeout", "validate", "training timeout", "validate", "validate"]
