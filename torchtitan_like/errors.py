"""User-facing error types.

A user mistake (bad config, missing file, bad data) raises `UserError`. The entry points catch it,
print one clear message without a traceback and exit with code 2, before any collective runs when the
mistake is detectable at start-up.
"""

from __future__ import annotations

import difflib
from typing import Iterable

USER_ERROR_EXIT_CODE = 2


class UserError(Exception):
    """A mistake in the user's input (config, files, data). Exit code 2, no traceback."""


class ConfigError(UserError):
    """A config value is missing, malformed, of the wrong type or out of range."""


class DataError(UserError):
    """A corpus, shard or tokenizer file is missing, empty or malformed."""


class StorageError(UserError):
    """The file system refused a write: full (ENOSPC), over quota (EDQUOT), read-only (EROFS), an I/O
    error (EIO), a permission. Not a mistake in the input, but not a bug either: the operator frees
    space or changes the folder and relaunches, so it gets the same one-line report and exit code 2
    as a user mistake rather than a traceback of library internals. Messages name the path, the OS
    error and, for a full disk, the free space left (torchtitan_like/filesystem.py)."""


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest candidate, or '' when none is close."""
    candidates = list(candidates)
    # A case slip ("8b" for "8B") is the commonest typo of a flavor name; difflib alone misses it.
    by_lower = {c.lower(): c for c in candidates}
    if name.lower() in by_lower:
        return f' (did you mean "{by_lower[name.lower()]}"?)'
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f' (did you mean "{matches[0]}"?)' if matches else ""


def run_command(run, argv) -> int:
    """Run a command-line entry point: a `UserError` prints one `error:` line (no traceback) and
    gives exit code 2."""
    import sys

    try:
        return run(sys.argv[1:] if argv is None else argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
