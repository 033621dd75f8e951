"""FSDP2 and HSDP train exactly like one process on the union of the data-parallel batches."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("plan", ["fsdp2", "fsdp4"])
def test_fsdp_matches_single_process(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


def test_hsdp_2x2_matches_single_process(assert_plan_matches_reference):
    assert_plan_matches_reference("hsdp_2x2")


def test_fsdp_bf16_compute_equals_one_process_in_bf16_with_the_rope_table_kept_in_fp32():
    """On a GPU FSDP computes in bf16 (the CPU plans above stay fp32). A mixed-precision policy that
    casts every unit's floating-point inputs would cast the blocks' fp32 RoPE cos/sin table too, and
    rotate q and k by bf16-rounded angles under FSDP only."""
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fsdp_mixed_precision_worker.py")
    output = launch([worker], 2, timeout=120, fork=True)
    result = json.loads(next(line for line in output.splitlines() if "RESULT " in line).split("RESULT ", 1)[1])
    assert result["attention_input_dtypes"] == ["torch.bfloat16", "torch.float32"], result
    assert result["logits_dtype"] == "torch.bfloat16"
    # the same bf16 parameters (gathered) and the same ops: equal bits, not a tolerance
    assert result["max_logit_difference"] == 0.0, result
