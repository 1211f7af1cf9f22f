"""Directories hpo writes into, checked once before the first write, and file names built
from names that come from outside (a study name in the storage may be anything)."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import time
from pathlib import Path

from hpo.errors import UserError

_SAFE = re.compile(r"[a-z0-9][a-z0-9_-]{0,99}")


class OutputDirError(UserError):
    """A directory hpo must write into is a file, read-only, or cannot be created."""


def check_writable_dir(path: Path, what: str) -> None:
    """Raise OutputDirError (one line, naming ``what``) unless ``path`` is, or can be made,
    a directory this process can write a file into and fsync.

    Nothing is created: a missing ``path`` is judged by its nearest existing ancestor (a
    directory that takes a probe file, with no file in the way), and the writer makes the
    directory when it first writes. A command that fails after this check (an unknown
    study, bad data) so leaves no empty ``reports/x`` or checkpoint directory behind.
    """
    try:
        if "\x00" in str(path):  # Path.exists() would just say False
            raise ValueError("embedded null byte")
        existing = path
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        probe = existing / f".hpo-write-test.{os.getpid()}.{time.monotonic_ns()}"
        try:
            with open(probe, "wb") as handle:
                handle.write(b"hpo")
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise OutputDirError(f"{what} {str(path)!r} is not usable: {reason}") from None
    except ValueError as error:  # a NUL in the path
        raise OutputDirError(f"{what} {str(path)!r} is not usable: {error}") from None


def safe_component(name: str) -> str:
    """``name`` as one file-name component that stays inside its parent directory: itself
    when it is a plain study name, else a slug of it plus a short hash (so two different
    names never share a directory)."""
    if _SAFE.fullmatch(name):
        return name
    slug = re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-")[:60] or "study"
    digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{slug}-{digest}"
