"""LR schedule values at warmup end, mid-decay and the final step, for every schedule type."""

import math

import pytest
import torch

from torchtitan_like.config.job_config import LRScheduler, Optimizer
from torchtitan_like.optim import build_lr_scheduler, build_optimizer, lr_multiplier

TOTAL, WARMUP, MIN = 110, 10, 0.1


def multiplier(step, decay_type, decay_ratio=-1.0):
    return lr_multiplier(step, total_steps=TOTAL, warmup_steps=WARMUP, decay_type=decay_type,
                         decay_ratio=decay_ratio, min_lr_factor=MIN)


@pytest.mark.parametrize("decay_type", ["cosine", "linear", "sqrt", "constant"])
def test_linear_warmup_reaches_peak_at_warmup_end(decay_type):
    assert multiplier(1, decay_type) == pytest.approx(1 / WARMUP)
    assert multiplier(WARMUP, decay_type) == 1.0
    # A straight line: the same increment at every warmup step, the last one included.
    ramp = [multiplier(step, decay_type) for step in range(1, WARMUP + 1)]
    assert [b - a for a, b in zip(ramp, ramp[1:])] == pytest.approx([1 / WARMUP] * (WARMUP - 1))


@pytest.mark.parametrize("decay_type,mid,final", [
    ("cosine", MIN + (1 - MIN) * 0.5, MIN),               # halfway through decay: cos(pi/2) = 0
    ("linear", MIN + (1 - MIN) * 0.5, MIN),
    ("sqrt", MIN + (1 - MIN) * (1 - math.sqrt(0.5)), MIN),
    ("constant", 1.0, 1.0),
])
def test_mid_and_final_values(decay_type, mid, final):
    assert multiplier(60, decay_type) == pytest.approx(mid)   # (60 - 10) / 100 = 0.5 through decay
    assert multiplier(TOTAL, decay_type) == pytest.approx(final)


def test_warmup_stable_decay_holds_peak_then_decays_over_the_last_fraction():
    # decay_ratio 0.2: stable until step 88, then linear decay over the last 22 steps.
    assert multiplier(50, "linear", 0.2) == 1.0
    assert multiplier(88, "linear", 0.2) == 1.0
    assert multiplier(99, "linear", 0.2) == pytest.approx(MIN + (1 - MIN) * 0.5)
    assert multiplier(TOTAL, "linear", 0.2) == pytest.approx(MIN)


def test_scheduler_applies_multiplier_to_each_optimizer_step():
    model = torch.nn.Linear(4, 4)
    optimizer = build_optimizer([model], Optimizer(lr=1.0), "cpu")
    scheduler = build_lr_scheduler(optimizer, LRScheduler(warmup_steps=WARMUP, decay_type="cosine",
                                                          min_lr_factor=MIN), TOTAL)
    seen = []
    for _ in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(multiplier(1, "cosine"))
    assert seen[WARMUP - 1] == pytest.approx(1.0)
    assert seen[-1] == pytest.approx(MIN)


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_weight_decay_skips_one_dimensional_parameters(name):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer([model], Optimizer(name=name, weight_decay=0.1), "cpu")
    assert type(optimizer).__name__ == name
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


@pytest.mark.parametrize("name", ["AdamW", "Adam"])
def test_weight_decay_moves_matrices_even_without_gradient(name):
    # Zero gradients: only weight decay can move a parameter (decoupled in AdamW, L2 in Adam).
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4))
    matrix, norm = model[0].weight.detach().clone(), model[1].weight.detach().clone()
    optimizer = build_optimizer([model], Optimizer(name=name, lr=0.1, weight_decay=0.1), "cpu")
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    assert ((model[0].weight.detach() - matrix) * matrix.sign() < 0).all()  # every entry pulled towards 0
    assert torch.equal(model[1].weight, norm)
