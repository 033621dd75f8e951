"""Per-block torch.compile, composed with per-op selective AC and FSDP, trains like eager."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_compiled_blocks_with_per_op_ac_under_fsdp2_match_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("fsdp2_compile_selective_op_ac")
