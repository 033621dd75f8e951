"""Pipeline parallel (GPipe, 1F1B, Interleaved1F1B, LoopedBFS, InterleavedZeroBubble, ZBVZeroBubble) alone and composed with FSDP and TP matches one
process: the schedule's microbatch losses are scaled so that they sum to the batch mean."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("plan", ["pp2_gpipe", "pp2_1f1b", "pp2_interleaved_1f1b", "pp2_looped_bfs",
                                  "pp2_interleaved_zero_bubble", "pp2_zbv_zero_bubble"])
def test_pp2_schedule_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


def test_pp2_with_split_point_and_gradient_accumulation_matches_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("pp2_split_point_grad_accumulation")


@pytest.mark.parametrize("plan", ["pp2_x_fsdp2", "pp2_x_tp2", "pp2_x_fsdp2_x_tp2"])
def test_pp2_composed_with_fsdp_and_tp_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


def test_pp2_float8_matches_single_process_accumulating_the_same_microbatches(assert_plan_matches_reference):
    assert_plan_matches_reference("pp2_float8")
