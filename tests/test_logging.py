"""Logging: rank 0 logs, other ranks only errors; a repeated warning prints once."""

import logging

from torchtitan_like.logging import init_logger, logger, warn_once


def test_only_the_log_rank_logs_info_and_warnings(capsys):
    init_logger(rank=1, log_rank=0)
    logger.info("info from rank 1")
    logger.warning("warning from rank 1")
    logger.error("error from rank 1")
    out = capsys.readouterr().out
    assert "info from rank 1" not in out and "warning from rank 1" not in out
    assert "[rank1]" in out and "error from rank 1" in out
    init_logger(rank=0, log_rank=0)
    assert logger.level == logging.INFO


def test_warn_once_deduplicates(capsys):
    init_logger(rank=0)
    for _ in range(3):
        warn_once("the same warning")
    assert capsys.readouterr().out.count("the same warning") == 1
