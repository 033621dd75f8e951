"""Each plan did to the model what its config asks, on every rank.

Parity with one process cannot see a parallelism that was silently not applied when skipping it
keeps the numbers: a TP plan whose layers were never sharded trains the full model on every rank
with the same batch, and activation checkpointing and compile change no value. So every plan also
reports what it did to its modules (tests/parallelisms/run_plan.py), checked here against its config.
"""

from __future__ import annotations

import pytest

from tests.parallelisms.harness import PLANS

pytestmark = pytest.mark.slow

DEBUG_MODEL_LAYERS = 4


def option(name: str, key: str, default: str) -> str:
    overrides = PLANS[name].overrides
    return overrides[overrides.index(key) + 1] if key in overrides else default


def expected_degrees(name: str) -> dict[str, int]:
    tp = int(option(name, "--parallelism.tensor_parallel_degree", "1"))
    pp = int(option(name, "--parallelism.pipeline_parallel_degree", "1"))
    replicate = int(option(name, "--parallelism.data_parallel_replicate_degree", "1"))
    shard = int(option(name, "--parallelism.data_parallel_shard_degree", "-1"))
    if shard == -1:
        shard = PLANS[name].nproc // (tp * pp * replicate)
    return {"tp": tp, "pp": pp, "dp_replicate": replicate, "dp_shard": shard}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_rank_is_sharded_checkpointed_compiled_and_converted_as_configured(plan_structure, name):
    degrees = expected_degrees(name)
    ac_mode = option(name, "--activation_checkpoint.mode", "none")
    ac_option = option(name, "--activation_checkpoint.selective_ac_option", "2")
    compiled = option(name, "--compile.enable", "false") == "true"
    float8 = option(name, "--float8.enable", "false") == "true"
    ranks = plan_structure(name)
    assert len(ranks) == PLANS[name].nproc

    for rank, structure in enumerate(ranks):
        where = f"{name}, rank {rank}"
        placements = [entry for entries in structure["sharding"].values() for entry in entries]
        for dim in ("tp", "dp_shard", "dp_replicate"):
            sharded_on_dim = any(entry.startswith(f"{dim}:") for entry in placements)
            assert sharded_on_dim == (degrees[dim] > 1), f"{where}: parameters on mesh dim {dim}: {sharded_on_dim}"
        if degrees["tp"] > 1:
            assert any(entry.startswith("tp:Shard(") for entry in placements), where
        if degrees["dp_shard"] > 1:  # FSDP shards every parameter along dim 0
            assert all(any(entry == "dp_shard:Shard(0)" for entry in entries)
                       for entries in structure["sharding"].values()), where

        blocks = structure["blocks"]
        if degrees["pp"] > 1:
            assert 0 < blocks < DEBUG_MODEL_LAYERS, f"{where}: {blocks} blocks on a pipeline rank"
        else:
            assert blocks == DEBUG_MODEL_LAYERS, where

        checkpointed = structure["checkpointed_blocks"]
        if ac_mode == "none":
            assert checkpointed == 0, where
        elif ac_mode == "full" or ac_option == "op":
            assert checkpointed == blocks, where
        else:  # every k-th block
            assert 0 < checkpointed < blocks, f"{where}: {checkpointed} of {blocks} blocks checkpointed"

        assert structure["compiled_blocks"] == (blocks if compiled else 0), where
        assert (structure["float8_linears"] > 0) == float8, where
        if degrees["pp"] == 1:  # the whole model on every rank: the head is tied exactly in tied flavors
            assert structure["tied_head"] == (option(name, "--model.flavor", "debugmodel") == "debugmodel_tied"), where
