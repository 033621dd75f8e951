"""Tensor + sequence parallel (with and without loss parallel), alone and under FSDP, match one process."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_tp2_with_sequence_and_loss_parallel_matches_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("tp2")


@pytest.mark.parametrize("plan", ["fsdp2_x_tp2", "fsdp2_x_tp2_no_loss_parallel"])
def test_fsdp2_x_tp2_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)
