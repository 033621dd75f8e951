"""Float8 training under FSDP2 with the weights all-gathered in fp8 and precomputed scales trains
exactly like FSDP2 gathering them in fp32 and casting after the gather (kernels/float8/fsdp.py),
with the transformer blocks compiled (the gathered fp8 weight is a tensor subclass input of the
compiled graphs, and backward re-gathers it in place)."""

from __future__ import annotations

import pytest
import torch

from tests.parallelisms.harness import PLANS

pytestmark = pytest.mark.slow


def test_fsdp2_fp8_all_gather_with_precomputed_scales_trains_bitwise_like_fp32_all_gather(plan_results):
    # Every element is cast with the full weight's scale either way, so the fp8 operands are the same
    # bits and nothing is summed in another order: equality, not a tolerance.
    plan = "fsdp2_float8_all_gather"
    losses, params = plan_results(plan)
    expected_losses, expected_params = plan_results(PLANS[plan].reference_name())
    assert len(losses) == len(expected_losses) > 1
    assert losses == expected_losses
    assert set(params) == set(expected_params)
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
