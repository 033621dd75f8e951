"""Activation checkpointing changes memory, never the math: every mode trains like no AC."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("plan", ["ac_full", "ac_selective_every_2nd_layer", "ac_selective_per_op"])
def test_activation_checkpointing_matches_no_checkpointing(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)
