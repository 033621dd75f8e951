"""Optimizer settings on resume: the config wins over the values restored from a checkpoint."""

import torch

from tests.checkpoint.common import build_model, train_step
from torchtitan_like.config.job_config import LRScheduler, Optimizer
from torchtitan_like.optim import build_lr_scheduler, build_optimizer, lr_multiplier, reapply_optimizer_config

SCHEDULE = LRScheduler(warmup_steps=2, decay_type="cosine")
STEPS = 10


def _train_and_save(config: Optimizer, steps: int):
    model = build_model()
    optimizer = build_optimizer([model], config, "cpu")
    scheduler = build_lr_scheduler(optimizer, SCHEDULE, STEPS)
    torch.manual_seed(0)
    for _ in range(steps):
        train_step(model, optimizer, scheduler)
    return model, optimizer.state_dict(), scheduler.state_dict()


def _resume(config: Optimizer, model, optimizer_state, scheduler_state):
    optimizer = build_optimizer([model], config, "cpu")
    scheduler = build_lr_scheduler(optimizer, SCHEDULE, STEPS)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    return optimizer, scheduler


def test_changed_lr_weight_decay_betas_and_eps_win_over_the_checkpoint_and_are_logged():
    saved = Optimizer(lr=2e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    model, optimizer_state, scheduler_state = _train_and_save(saved, steps=3)
    changed = Optimizer(lr=1e-4, weight_decay=0.0, beta1=0.8, beta2=0.99, eps=1e-6)
    optimizer, scheduler = _resume(changed, model, optimizer_state, scheduler_state)
    lines = reapply_optimizer_config(optimizer, scheduler, changed)
    expected_lr = 1e-4 * lr_multiplier(4, total_steps=STEPS, warmup_steps=2, decay_type="cosine", decay_ratio=-1.0,
                                       min_lr_factor=SCHEDULE.min_lr_factor)
    for group in optimizer.param_groups:
        assert group["lr"] == expected_lr and group["initial_lr"] == 1e-4  # step 4 of the schedule, new peak
        assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-6 and group["weight_decay"] == 0.0
    assert scheduler.base_lrs == [1e-4, 1e-4] and scheduler.get_last_lr() == [expected_lr] * 2
    assert "optimizer.lr changed on resume: 0.002 -> 0.0001" in lines
    assert "optimizer.weight_decay changed on resume: 0.1 -> 0" in lines
    assert "optimizer.beta1, beta2 changed on resume: 0.9, 0.95 -> 0.8, 0.99" in lines
    assert "optimizer.eps changed on resume: 1e-08 -> 1e-06" in lines
    scheduler.step()  # the next step follows the same schedule at the new peak
    assert optimizer.param_groups[0]["lr"] == 1e-4 * lr_multiplier(
        5, total_steps=STEPS, warmup_steps=2, decay_type="cosine", decay_ratio=-1.0, min_lr_factor=SCHEDULE.min_lr_factor)


def test_new_weight_decay_reaches_only_the_decayed_group():
    model, optimizer_state, scheduler_state = _train_and_save(Optimizer(weight_decay=0.1), steps=1)
    changed = Optimizer(weight_decay=0.05)
    optimizer, scheduler = _resume(changed, model, optimizer_state, scheduler_state)
    reapply_optimizer_config(optimizer, scheduler, changed)
    decay, no_decay = optimizer.param_groups
    assert all(param.ndim >= 2 for param in decay["params"]) and decay["weight_decay"] == 0.05
    assert all(param.ndim < 2 for param in no_decay["params"]) and no_decay["weight_decay"] == 0.0


def test_an_unchanged_config_changes_nothing_bit_for_bit():
    config = Optimizer(lr=3e-3)
    model, optimizer_state, scheduler_state = _train_and_save(config, steps=3)
    optimizer, scheduler = _resume(config, model, optimizer_state, scheduler_state)
    restored = [dict(group, params=None) for group in optimizer.param_groups]
    assert reapply_optimizer_config(optimizer, scheduler, config) == []
    assert [dict(group, params=None) for group in optimizer.param_groups] == restored


def test_a_checkpoint_from_another_implementation_resumes_on_this_runs_kernel():
    # Loading copies the saved groups' fused/foreach flags: a run saved with torch's fused AdamW
    # (fused=True, foreach=None) would have resumed a foreach run on the fused path.
    fused_config, foreach_config = Optimizer(lr=3e-3, implementation="fused"), Optimizer(lr=3e-3)
    model, optimizer_state, scheduler_state = _train_and_save(fused_config, steps=2)
    optimizer, scheduler = _resume(foreach_config, model, optimizer_state, scheduler_state)
    assert all(group["fused"] for group in optimizer.param_groups)  # what loading alone leaves
    assert reapply_optimizer_config(optimizer, scheduler, foreach_config) == []  # not logged: no numbers change
    assert all(group["foreach"] and not group["fused"] for group in optimizer.param_groups)


def test_switching_adamw_to_adam_on_resume_drops_the_decoupled_decay():
    # Loading restores the saved groups' decoupled_weight_decay: the "Adam" run kept AdamW's decay.
    model, optimizer_state, scheduler_state = _train_and_save(Optimizer(name="AdamW", weight_decay=0.1), steps=1)
    adam = Optimizer(name="Adam", weight_decay=0.1)
    optimizer, scheduler = _resume(adam, model, optimizer_state, scheduler_state)
    assert all(group["decoupled_weight_decay"] for group in optimizer.param_groups)  # what loading alone leaves
    lines = reapply_optimizer_config(optimizer, scheduler, adam)
    assert not any(group["decoupled_weight_decay"] for group in optimizer.param_groups)
    assert "optimizer.decoupled_weight_decay (AdamW) changed on resume: true -> false" in lines


def test_auto_implementation_is_triton_on_cuda_fused_without_triton_and_foreach_on_cpu(monkeypatch):
    from torchtitan_like.kernels import adamw
    from torchtitan_like.optim.optimizers import resolve_implementation

    assert resolve_implementation("auto", "cpu") == "foreach"
    assert resolve_implementation("auto", "cuda") == "triton"
    assert resolve_implementation("fused", "cuda") == "fused"
    assert resolve_implementation("auto", "cuda", offloaded=True) == "fused"  # FSDP CPU offload
    model = build_model()  # parameters on the CPU of a "cuda" run: offloaded
    assert build_optimizer([model], Optimizer(), "cuda").defaults["fused"]
    monkeypatch.setattr(adamw, "triton", None)
    assert resolve_implementation("auto", "cuda") == "fused"


def test_a_changed_schedule_on_resume_is_followed_and_logged_and_a_changed_peak_alone_is_not():
    # The scheduler restores only its step: training.steps and [lr_scheduler] come from the config,
    # so an extended run's LR jumps from the finished schedule's minimum back up the new one.
    config = Optimizer(lr=2e-3)
    model, optimizer_state, scheduler_state = _train_and_save(config, steps=3)
    optimizer = build_optimizer([model], config, "cpu")
    longer = LRScheduler(warmup_steps=4, decay_type="linear")
    scheduler = build_lr_scheduler(optimizer, longer, 2 * STEPS)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    lines = reapply_optimizer_config(optimizer, scheduler, config)
    new = lr_multiplier(4, total_steps=2 * STEPS, warmup_steps=4, decay_type="linear", decay_ratio=-1.0,
                        min_lr_factor=longer.min_lr_factor)
    old = lr_multiplier(4, total_steps=STEPS, warmup_steps=2, decay_type="cosine", decay_ratio=-1.0,
                        min_lr_factor=SCHEDULE.min_lr_factor)
    assert optimizer.param_groups[0]["lr"] == 2e-3 * new
    expected = (f"LR schedule changed on resume (training.steps or [lr_scheduler]): step 4 uses {new:g} x peak "
                f"= {2e-3 * new:g}, where the checkpointed run's schedule gave {old:g} x peak")
    assert lines == [expected]
    optimizer, scheduler = _resume(Optimizer(lr=1e-3), *_train_and_save(config, steps=3))
    assert reapply_optimizer_config(optimizer, scheduler, Optimizer(lr=1e-3)) == [
        "optimizer.lr changed on resume: 0.002 -> 0.001"]
