"""FSDP2 and HSDP train exactly like one process on the union of the data-parallel batches."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("plan", ["fsdp2", "fsdp4"])
def test_fsdp_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


def test_hsdp_2x2_matches_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("hsdp_2x2")
