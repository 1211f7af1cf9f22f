"""Every file hpo writes for a user appears whole or not at all.

A report, an exported configuration, a trials CSV or a dashboard artifact is first
written under a temporary name beside its target (``.NAME.PID.tmp``, or a temporary
directory for a report's many files), flushed to disk, then renamed over the target. A
Ctrl-C, a full disk or a read-only file system part way leaves the previous version (or
nothing) and removes the temporary; the error reaches the user as one line
(``OutputWriteError``: exit 2) naming the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from hpo.errors import UserError


class OutputWriteError(UserError):
    """An output file could not be written (disk full, read-only, permission)."""


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


@contextmanager
def atomic_path(path: Path, what: str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, the file
    written there replaces ``path`` in one rename. Any exception (Ctrl-C included) removes
    the temporary and leaves ``path`` as it was; an OSError becomes OutputWriteError.
    A target that exists and is not a regular file (``/dev/stdout``, a pipe) is written
    in place: there is nothing to replace."""
    if path.exists() and not path.is_file():
        try:
            yield path
        except OSError as error:
            raise OutputWriteError(
                f"{what} {path}: cannot write ({error.strerror or error})"
            ) from None
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield temporary
        _fsync(temporary)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OutputWriteError(f"{what} {path}: cannot write ({error.strerror or error})") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, what: str) -> None:
    with atomic_path(path, what) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_stream(path: Path, content: BinaryIO, what: str) -> None:
    with atomic_path(path, what) as temporary, open(temporary, "wb") as handle:
        shutil.copyfileobj(content, handle)


@contextmanager
def atomic_dir(out_dir: Path, what: str) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out_dir``; when the block ends normally,
    its files move into ``out_dir`` (one rename of the directory when ``out_dir`` does not
    exist yet, else one rename per file, each whole). On any exception the staging
    directory is removed and ``out_dir`` keeps the previous files."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(
            tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent)
        )
    except OSError as error:
        raise OutputWriteError(
            f"{what} {out_dir}: cannot write ({error.strerror or error})"
        ) from None
    try:
        yield staging
        _publish(staging, out_dir)
    except OSError as error:
        raise OutputWriteError(
            f"{what} {out_dir}: cannot write ({error.strerror or error})"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path) -> None:
    files = sorted(p for p in staging.iterdir() if p.is_file())
    for file in files:
        _fsync(file)
    umask = os.umask(0)
    os.umask(umask)
    if not out_dir.exists():
        staging.chmod(0o777 & ~umask)
        os.rename(staging, out_dir)
        return
    for file in files:
        os.replace(file, out_dir / file.name)


def artifact_store(base: Path) -> object:
    """Optuna's file-system artifact store whose ``write`` is whole-or-nothing (Optuna's
    own copies straight into the final file, so an interrupted upload leaves half a PNG)."""
    from optuna.artifacts import FileSystemArtifactStore

    class WholeFileArtifactStore(FileSystemArtifactStore):
        def write(self, artifact_id: str, content_body: BinaryIO) -> None:
            target = (base / artifact_id).resolve()
            if target.parent != base.resolve():  # ids are Optuna's UUIDs: one plain name
                raise ValueError(f"Invalid artifact_id: {artifact_id}")
            write_stream(target, content_body, "artifact")

    return WholeFileArtifactStore(base)
