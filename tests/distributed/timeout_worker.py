"""Worker for test_setup.py (4 gloo ranks): the comm timeouts reach every group of the mesh, and a
rank that stops answering makes the other's collective fail after the training timeout."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from torchtitan_like.config import load_config
from torchtitan_like.distributed.setup import (init_process_group, mesh_groups, set_group_timeouts, set_train_timeout,
                                               startup_timeout)
from torchtitan_like.parallelisms.parallel_dims import ParallelDims


def timeouts(mesh) -> list[float]:
    return [group._get_backend(torch.device("cpu")).options._timeout.total_seconds() for group in mesh_groups(mesh)]


def main() -> None:
    # FSDP 2 x TP 2: the dp_shard and tp groups, besides the default group
    config, _ = load_config(["--comm.init_timeout_seconds", "77", "--comm.train_timeout_seconds", "2",
                             "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2"])
    init_process_group(torch.device("cpu"), config.comm)
    mesh = ParallelDims.from_config(config.parallelism, 4).build_mesh("cpu")
    rank = dist.get_rank()
    set_group_timeouts(config.comm.init_timeout_seconds, mesh)
    print(f"rank {rank} groups {len(mesh_groups(mesh))} init timeouts {timeouts(mesh)}", flush=True)
    set_train_timeout(config.comm, mesh)
    print(f"rank {rank} train timeouts {timeouts(mesh)}", flush=True)
    with startup_timeout(config.comm, mesh):  # e.g. the first validation, which compiles
        print(f"rank {rank} first-validation timeouts {timeouts(mesh)}", flush=True)
    print(f"rank {rank} after-validation timeouts {timeouts(mesh)}", flush=True)
    if rank == 1:
        time.sleep(8)  # stops answering for longer than the training timeout
    start = time.perf_counter()
    try:
        dist.all_reduce(torch.ones(1), group=mesh["tp"].get_group())
        print(f"rank {rank} collective returned after {time.perf_counter() - start:.1f}s", flush=True)
    except Exception as error:  # gloo raises on timeout
        print(f"rank {rank} collective failed after {time.perf_counter() - start:.1f}s: {type(error).__name__}",
              flush=True)
    os._exit(0)  # the groups are broken now: no teardown collective


if __name__ == "__main__":
    main()
