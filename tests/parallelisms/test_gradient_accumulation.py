"""Two accumulated microbatches of 4 equal one batch of 8."""

from __future__ import annotations


def test_two_accumulation_steps_match_double_batch(assert_plan_matches_reference):
    assert_plan_matches_reference("grad_accumulation_2")
