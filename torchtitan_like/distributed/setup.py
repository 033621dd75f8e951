"""Device choice and process-group start-up (CUDA + NCCL when GPUs exist, CPU + gloo otherwise)."""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from torchtitan_like.errors import ConfigError


def world_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; one process when unset."""
    return (int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")))


def resolve_device(device_choice: str) -> torch.device:
    """`auto` picks this process's GPU (by LOCAL_RANK) when CUDA is available, else the CPU."""
    _, local_rank, _ = world_info()
    if device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("training.device = 'cuda' but CUDA is not available on this machine; use 'auto' or 'cpu'")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(device: torch.device, comm_config) -> None:
    """Start the default process group when launched with more than one process.

    On CUDA the NCCL flight recorder keeps the last `trace_buf_size` collectives so that a hang
    leaves a dump (TORCH_NCCL_DUMP_ON_TIMEOUT) instead of silence.
    """
    _, _, world_size = world_info()
    if world_size == 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", str(comm_config.trace_buf_size))
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1" if comm_config.trace_buf_size > 0 else "0")
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    timeout = datetime.timedelta(seconds=comm_config.init_timeout_seconds)
    rank, _, world_size = world_info()
    # torchrun keeps one store across restarts of the worker group (--max-restarts): a restarted
    # group must not read the addresses its dead predecessor published, so each attempt gets its
    # own key prefix.
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"torchtitan_like/attempt_{attempt}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout,
                            device_id=device if device.type == "cuda" else None)


def mesh_groups(mesh) -> list:
    """The default group and every process group of `mesh`: one per dim, plus flattened dims (dp)."""
    groups = [dist.distributed_c10d._get_default_group()]
    if mesh is not None:
        groups += [mesh.get_group(dim) for dim in range(mesh.ndim)]
        for name in ("dp",):
            try:
                groups.append(mesh[name].get_group())
            except (KeyError, RuntimeError, ValueError):
                pass  # not flattened in this mesh
    unique = {id(group): group for group in groups}
    return list(unique.values())


def set_group_timeouts(seconds: float, mesh) -> None:
    """Give every group that carries training traffic the timeout `seconds`. The mesh's groups are
    created with torch's defaults (10 min NCCL, 30 min gloo), not the default group's, and FSDP, TP,
    PP and the loss reduction all run on them."""
    if not dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=seconds)
    for group in mesh_groups(mesh):
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def set_train_timeout(comm_config, mesh) -> None:
    """After the first step (start-up, checkpoint loading and compilation are done), every group runs
    under the (usually shorter) training timeout. The barrier keeps a rank from shortening it while
    another is still in a step under the start-up timeout."""
    if not dist.is_initialized():
        return
    dist.barrier()
    set_group_timeouts(comm_config.train_timeout_seconds, mesh)


@contextlib.contextmanager
def startup_timeout(comm_config, mesh):
    """Run a block under the start-up timeout again, then return to the training one: for work that
    compiles mid-run, like the first validation (torch.compile builds the forward-only graphs then,
    and under pipeline parallel a stage waits while the stages before it compile, one after
    another, as at step 1)."""
    if not dist.is_initialized():
        yield
        return
    set_group_timeouts(comm_config.init_timeout_seconds, mesh)
    try:
        yield
    finally:
        set_train_timeout(comm_config, mesh)


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
