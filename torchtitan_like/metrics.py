"""Training metrics: tokens/s, MFU, memory, data-loading share, ETA; console and TensorBoard.

MFU = achieved model FLOP/s per device / peak dense bf16 FLOP/s of the device. Model FLOPs per
token come from the model's `flops_per_token(seq_len)` (6N + attention term, see
models/llama3/args.py). Peak FLOPs come from the table below (vendor datasheets, dense bf16,
no sparsity) or `metrics.peak_flops`; on a CPU MFU is reported as n/a rather than made up.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch

from torchtitan_like.filesystem import describe, error_path
from torchtitan_like.logging import logger

# Dense bf16 tensor-core peak per device (FLOP/s), from NVIDIA datasheets.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 SXM": 989e12,   # also "H100 80GB HBM3"
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "B200": 2250e12,
    "GB200": 2500e12,
    "L40S": 362e12,
}


def peak_flops_for(device_name: str) -> float | None:
    """Look a CUDA device name up in PEAK_BF16_FLOPS; None when unknown."""
    name = device_name.upper()
    if "H200" in name:
        return PEAK_BF16_FLOPS["H200"]
    if "H100" in name:
        if "NVL" in name:
            return PEAK_BF16_FLOPS["H100 NVL"]
        if "PCIE" in name:
            return PEAK_BF16_FLOPS["H100 PCIe"]
        return PEAK_BF16_FLOPS["H100 SXM"]
    for key in ("GB200", "B200", "H800", "A100", "A800", "L40S"):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def device_peak_flops(device: torch.device, override: float) -> float | None:
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device))


@dataclass
class StepMetrics:
    step: int
    loss: float
    grad_norm: float
    lr: float
    tokens_per_second: float
    mfu: float | None
    memory_gib: float | None
    memory_pct: float | None
    data_time_share: float
    eta_seconds: float
    extra: dict = field(default_factory=dict)


class MetricsLogger:
    """Accumulates per-step timings and writes a log line and TensorBoard scalars every log_freq."""

    def __init__(self, metrics_config, dump_folder: str, device: torch.device, flops_per_token: int,
                 total_steps: int, rank: int):
        self.config = metrics_config
        self.device = device
        self.flops_per_token = flops_per_token
        self.total_steps = total_steps
        self.peak_flops = device_peak_flops(device, metrics_config.peak_flops)
        self.writer = None
        self.tensorboard_folder = os.path.join(dump_folder, metrics_config.save_tb_folder)
        if metrics_config.save_for_all_ranks:
            self.tensorboard_folder = os.path.join(self.tensorboard_folder, f"rank_{rank}")
        # The writer (and its events file) is made at the first scalar, not here: a relaunch that the
        # checkpoint load refuses, or a run that stops before its first log line, leaves no empty
        # events file behind to clutter TensorBoard's run list.
        self.tensorboard_on = metrics_config.enable_tensorboard and (rank == 0 or metrics_config.save_for_all_ranks)
        self.rank = rank
        self._reset_window(time.perf_counter())
        self.start_time = time.perf_counter()
        self.steps_run = 0  # by this process: a resumed run's restored steps took no time here
        # End of this process's first step, which carries compilation and warm-up: the ETA's time per
        # step is measured after it, else a 60 s compile would inflate the ETA for hundreds of steps.
        self.first_step_end: float | None = None
        self._tensorboard_started = False  # whether this process has written a scalar yet

    def _reset_window(self, now: float) -> None:
        self.window_start, self.window_tokens, self.window_data_time = now, 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def record_step(self, tokens: float, data_seconds: float) -> None:
        """Count the tokens this device processed in one optimizer step (its share of its data-parallel
        rank's batch) and the time spent waiting on data."""
        self.steps_run += 1
        if self.steps_run == 1:
            self.first_step_end = time.perf_counter()
        self.window_tokens += tokens
        self.window_data_time += data_seconds

    def should_log(self, step: int) -> bool:
        return step == 1 or step % self.config.log_freq == 0 or step == self.total_steps

    def log(self, step: int, loss: float, grad_norm: float, lr: float, extra: dict | None = None) -> StepMetrics:
        now = time.perf_counter()
        elapsed = max(now - self.window_start, 1e-9)
        tokens_per_second = self.window_tokens / elapsed
        mfu = None
        if self.peak_flops:
            mfu = 100.0 * tokens_per_second * self.flops_per_token / self.peak_flops
        memory_gib = memory_pct = None
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_reserved(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            memory_gib, memory_pct = peak / 2**30, 100.0 * peak / total
        if self.steps_run > 1:
            seconds_per_step = (now - self.first_step_end) / (self.steps_run - 1)
        else:
            seconds_per_step = now - self.start_time
        metrics = StepMetrics(step=step, loss=loss, grad_norm=grad_norm, lr=lr, tokens_per_second=tokens_per_second,
                              mfu=mfu, memory_gib=memory_gib, memory_pct=memory_pct,
                              data_time_share=100.0 * self.window_data_time / elapsed,
                              eta_seconds=seconds_per_step * (self.total_steps - step), extra=extra or {})
        logger.info(format_line(metrics, self.total_steps, color=not self.config.disable_color_printing))
        if self.tensorboard_on:
            self._write_tensorboard(metrics)
        self._reset_window(now)
        return metrics

    def _write_tensorboard(self, m: StepMetrics) -> None:
        scalars = {"loss_metrics/global_avg_loss": m.loss, "grad_norm": m.grad_norm, "lr": m.lr,
                   "throughput(tps)": m.tokens_per_second, "time_metrics/data_loading(%)": m.data_time_share}
        if m.mfu is not None:
            scalars["mfu(%)"] = m.mfu
        if m.memory_gib is not None:
            scalars["memory/max_reserved(GiB)"] = m.memory_gib
            scalars["memory/max_reserved(%)"] = m.memory_pct
        scalars.update(m.extra)
        self._add_scalars(scalars, m.step)

    def _add_scalars(self, scalars: dict, step: int) -> None:
        try:
            if self.writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(self.tensorboard_folder)
            if not self._tensorboard_started:
                # A run resumed from a checkpoint logs again the steps after it that the interrupted run
                # had logged; a session start at the first step this process runs makes TensorBoard drop
                # those older values instead of showing the curve going back (what SummaryWriter's
                # purge_step writes).
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                first_step = step - self.steps_run + 1 if self.steps_run else step
                self.writer.file_writer.add_event(Event(step=first_step,
                                                        session_log=SessionLog(status=SessionLog.START)))
                self._tensorboard_started = True
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as error:
            self._tensorboard_failed(error)

    def _tensorboard_failed(self, error: OSError) -> None:
        """A TensorBoard write failed (a full disk, a read-only folder): warn once and train on without
        TensorBoard. The scalars are a record of the run, its state is the checkpoint: stopping here
        would lose every step since the last checkpoint, and the console log keeps every value. (If
        the disk is full, the next checkpoint save stops the run with an error that says so.)"""
        path = error_path(error, self.tensorboard_folder)
        logger.warning(f"TensorBoard: cannot write {path}: {describe(error, self.tensorboard_folder)}; TensorBoard "
                       f"logging is off for the rest of this run, training goes on (the log lines keep every metric)")
        if self.writer is not None:
            with contextlib.suppress(Exception):  # its writer thread died with the same error
                self.writer.close()
        self.writer = None
        self.tensorboard_on = False

    @contextlib.contextmanager
    def untimed(self):
        """Leave the time spent inside (validation) out of the training window, so tokens/s, MFU and the
        data share of the next log line measure training only (TorchTitan restarts its window after
        validation too). The ETA still counts it: validation recurs until the end."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def log_validation(self, step: int, loss: float) -> None:
        import math

        perplexity = math.exp(min(loss, 50.0))
        logger.info(f"validation step {step}: loss {loss:.4f}  perplexity {perplexity:.2f}")
        if self.tensorboard_on:
            self._add_scalars({"validation_metrics/loss": loss, "validation_metrics/perplexity": perplexity}, step)

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()  # flushes what is still queued
            except OSError as error:
                self._tensorboard_failed(error)


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_line(m: StepMetrics, total_steps: int, color: bool = False) -> str:
    mfu = f"{m.mfu:.1f}%" if m.mfu is not None else "n/a"
    memory = f"{m.memory_gib:.2f}GiB({m.memory_pct:.1f}%)" if m.memory_gib is not None else "n/a"
    step = f"step {m.step:>5}/{total_steps}"
    loss = f"loss {m.loss:8.4f}"
    if color:
        step, loss = f"\033[31m{step}\033[39m", f"\033[36m{loss}\033[39m"
    return (f"{step}  {loss}  grad_norm {m.grad_norm:7.4f}  lr {m.lr:.2e}  tps/device {m.tokens_per_second:,.0f}  "
            f"mfu {mfu}  memory {memory}  data {m.data_time_share:.1f}%  eta {format_eta(m.eta_seconds)}")
