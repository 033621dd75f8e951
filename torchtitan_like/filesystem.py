"""Writes that fail clearly: what the file system said, where, and how much space is left.

A full disk (ENOSPC), an exhausted quota (EDQUOT), a read-only mount (EROFS) or an I/O error (EIO)
reaches us in several disguises: an `OSError` without a file name (a failed `write` has none), a
`RuntimeError` of torch.save's zip writer whose `__context__` holds the `OSError`, a safetensors
error whose text ends in `(os error 28)`. `find_os_error` recovers the `OSError` from all of them,
and `storage_error` turns it into a `StorageError` (exit code 2, one line) that names the path, the
error and, for a full disk, the free space on that file system (`shutil.disk_usage`).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile

from torchtitan_like.errors import StorageError

_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")  # Rust's io::Error, as safetensors reports it


def find_os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: itself, its cause or context (torch.save raises a RuntimeError
    while the disk's OSError is its context), or one named in its text (`... (os error 28)`)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        match = _OS_ERROR_IN_TEXT.search(str(error))
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


def with_path(error: OSError, path: str | os.PathLike) -> OSError:
    """`error` naming `path` when it names no file (a failed write does not), same errno and subclass."""
    if error.filename is not None:
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno or 0), os.fspath(path))


def error_path(error: OSError, default: str | os.PathLike) -> str:
    """The file `error` names (some libraries give it as bytes), else `default`."""
    return os.fsdecode(error.filename) if error.filename is not None else os.fspath(default)


def _existing_ancestor(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def free_space(path: str | os.PathLike) -> str:
    """'1.2 GiB free of 500.0 GiB' on the file system holding `path` (or its nearest existing folder)."""
    try:
        usage = shutil.disk_usage(_existing_ancestor(os.fspath(path)))
    except OSError:
        return "free space unknown"
    return f"{format_bytes(usage.free)} free of {format_bytes(usage.total)}"


def describe(error: OSError, path: str | os.PathLike | None = None) -> str:
    """'No space left on device (ENOSPC)', and for a full disk or quota with `path` given, '; 1.2 GiB
    free of 500.0 GiB on that file system'."""
    text = error.strerror or str(error)
    name = errno.errorcode.get(error.errno or 0)
    text = f"{text} ({name})" if name else text
    if path is not None and error.errno in (errno.ENOSPC, errno.EDQUOT):
        text += f"; {free_space(path)} on that file system"
        if error.errno == errno.EDQUOT:
            text += " (the quota, not the disk, is exhausted)"
    return text


def storage_error(action: str, path: str | os.PathLike, error: OSError, outcome: str = "") -> StorageError:
    """StorageError '<action> failed: <path>: <OS error>[; <free space> on that file system][. <outcome>]'.
    Build it after removing what the failed write left, so the free space counts what was given back."""
    message = f"{action} failed: {error_path(error, path)}: {describe(error, path)}"
    return StorageError(message + (f". {outcome}" if outcome else ""))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`Path(path).write_bytes(data)` whose OSError names `path` (a failed write names no file)."""
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError as error:
        if error.filename is None:
            raise with_path(error, path) from error
        raise


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `path` whole or not at all: a temporary file beside it, then a rename. A full disk leaves
    the previous version in place (opening `path` with "w" would truncate it first)."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        try:
            os.remove(temporary)
        except OSError:
            pass
        if isinstance(error, OSError) and error.filename is None:
            raise with_path(error, path) from error
        raise
