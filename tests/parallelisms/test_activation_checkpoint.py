"""Activation checkpointing changes memory, never the math: every mode trains like no AC."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("plan", ["ac_full", "ac_selective_every_2nd_layer", "ac_selective_per_op",
                                  "tp2_float8_selective_op_ac"])
def test_activation_checkpointing_matches_no_checkpointing(assert_plan_matches_reference, plan):
    assert_plan_matches_reference(plan)


def test_per_op_checkpointing_recomputes_no_matmul_attention_reduce_scatter_or_amax_all_reduce():
    import json
    import os

    from tests.helpers import launch

    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ac_recompute_worker.py")
    output = launch([worker], 2, timeout=120, fork=True)
    counts = {entry["mode"]: entry for entry in
              (json.loads(line.split("COUNTS ", 1)[1]) for line in output.splitlines() if "COUNTS " in line)}
    none, full, per_op = counts["none/1"], counts["full/1"], counts["selective/op"]
    attention, all_gather, reduce_scatter = ("aten._scaled_dot_product_flash_attention_for_cpu",
                                             "_c10d_functional.all_gather_into_tensor",
                                             "_c10d_functional.reduce_scatter_tensor")
    # full AC re-runs every block forward: its matmuls, attention and collectives
    assert full["aten.mm"] > none["aten.mm"] and full[attention] > none[attention] == 0
    assert full[reduce_scatter] > none[reduce_scatter]
    # per-op AC keeps their outputs: backward runs what it runs without AC
    assert per_op["aten.mm"] == none["aten.mm"]
    assert per_op[attention] == 0
    assert per_op[reduce_scatter] == none[reduce_scatter]
    # the sequence-parallel all-gathers are recomputed (their outputs are full-sequence activations)
    assert per_op[all_gather] == full[all_gather] > none[all_gather]
    # Float8 under TP all-reduces its amaxes: per-op AC keeps them, full AC reduces them again
    all_reduce = "_c10d_functional.all_reduce"
    none, full, per_op = counts["none/1/float8"], counts["full/1/float8"], counts["selective/op/float8"]
    assert full[all_reduce] > none[all_reduce] > 0
    assert per_op[all_reduce] == none[all_reduce] and per_op["aten.mm"] == none["aten.mm"]
