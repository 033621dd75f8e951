"""Rank-aware logging: rank 0 logs by default, every line carries its rank, warnings once."""

from __future__ import annotations

import logging
import os
import sys

logger = logging.getLogger("torchtitan_like")
_warned: set[str] = set()


def init_logger(rank: int | None = None, log_rank: int = 0) -> None:
    """Configure the package logger; ranks other than `log_rank` only log errors, so a warning that
    every rank hits prints once (from `log_rank`), not once per rank."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank{rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO if rank == log_rank else logging.ERROR)
    logger.propagate = False


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)
