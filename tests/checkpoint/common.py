"""Shared pieces of the checkpoint tests: a tiny Llama, its optimizer and scheduler, a fake
stateful dataloader, and a runner that executes a function on N gloo ranks with a timeout."""

from __future__ import annotations

import os
import time
import traceback
from types import SimpleNamespace

import torch
import torch.multiprocessing as mp

from torchtitan_like.config.job_config import Checkpoint
from torchtitan_like.models.llama3 import Transformer, get_flavor
from tests.helpers import free_port


def tiny_args(**overrides):
    args = get_flavor("debugmodel")
    args.vocab_size, args.dim, args.n_layers, args.n_heads, args.n_kv_heads = 128, 64, 2, 4, 2
    args.multiple_of, args.max_seq_len = 32, 64
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def build_model(args=None, seed=0):
    model = Transformer(args or tiny_args())
    model.init_weights(seed)
    return model


def build_training(model, lr=1e-2):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda count: 1.0 / (count + 1))
    return optimizer, scheduler


def train_step(model, optimizer, scheduler, seed_tokens=None):
    tokens = torch.randint(0, model.args.vocab_size, (2, 16))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    return loss.detach()


class FakeDataloader:
    """Stateful stand-in for StatefulDataLoader: a position and a nested state."""

    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position, "sampler": {"epoch": 1, "order": (3, 1, 2)}, "name": "fake"}

    def load_state_dict(self, state):
        assert state["sampler"]["order"] == (3, 1, 2)
        self.position = state["position"]


def checkpoint_config(**overrides) -> Checkpoint:
    config = Checkpoint()
    config.enable, config.interval, config.last_save_model_only = True, 1, False
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _worker(rank, world_size, port, fn, args, error_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        fn(rank, world_size, *args)
        dist.barrier()
    except BaseException:  # report to the parent, which fails the test with the traceback
        error_queue.put((rank, traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()



# Ranks are forked from multiprocessing's fork server, which imports these once per test session:
# spawned ranks each spent ~4 s of CPU importing torch and the trainer, and ~1 s tearing it down.
# Unlike fork from pytest, the server has no threads of earlier tests (async checkpoint writers).
FORK_SERVER_PRELOAD = ["torchtitan_like.trainer", "tests.checkpoint.common"]


def run_on_ranks(fn, world_size: int, *args, timeout: float = 150.0) -> None:
    """Run fn(rank, world_size, *args) on `world_size` gloo processes; fail (never hang) on timeout.
    `fn` and `args` are pickled: module-level functions of test modules."""
    os.environ["OMP_NUM_THREADS"] = "1"  # before the fork server starts: its children inherit its environment
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(FORK_SERVER_PRELOAD)
    error_queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=_worker, args=(rank, world_size, port, fn, args, error_queue))
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    hung = [process for process in processes if process.is_alive()]
    for process in hung:
        process.kill()
        process.join()
    errors = []
    while not error_queue.empty():
        errors.append(error_queue.get())
    assert not errors, "\n".join(f"rank {rank}:\n{text}" for rank, text in errors)
    assert not hung, f"{len(hung)} rank(s) timed out after {timeout}s"
    assert all(process.exitcode == 0 for process in processes), [process.exitcode for process in processes]


def namespace(**kwargs):
    return SimpleNamespace(**kwargs)
