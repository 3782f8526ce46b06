"""Writing files so that an interruption never leaves one that looks complete.

Every file a run writes goes through ``atomic_write``: the content is written to a temporary name
in the same folder, flushed to disk, and renamed over the final name, which either names the old
file or the complete new one, never a part. ``check_writable_folder`` tells, before any compute,
whether a folder can be written at all.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Tests set this to a point's name (``pause_point``) to stop the process there and kill it.
PAUSE_ENV = "LCD_BAYES_TEST_PAUSE_AT"


class UnwritableError(OSError):
    """A destination that cannot be written; the message says why and what to do."""


def partial_name(path: Path) -> Path:
    """The temporary name ``atomic_write`` writes ``path`` under: its suffix kept last, since some
    writers (matplotlib, anndata) choose the format by it."""
    return path.with_name(f"{path.stem}.partial{path.suffix}")


@contextlib.contextmanager
def atomic_write(path: str | Path):
    """``with atomic_write(path) as tmp:`` write the file to ``tmp``; when the block ends, ``tmp``
    is synced to disk and renamed to ``path`` (removed instead when the block raises)."""
    path = Path(path)
    tmp = partial_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        pause_point(f"write {path.name}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _sync_folder(path.parent)


def write_text(path: str | Path, text: str) -> None:
    """``Path.write_text``, atomically (UTF-8)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data) -> Path:
    """``data`` as indented JSON at ``path``, its folder made if missing, atomically (numpy
    numbers as numbers); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=1, default=float))
    return path


def _sync_folder(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk (POSIX; not possible on Windows).
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def pause_point(name: str) -> None:
    """Where a test may stop the process (``LCD_BAYES_TEST_PAUSE_AT=name``) to kill it there: the
    process says so on stderr and waits. Nothing happens otherwise."""
    if os.environ.get(PAUSE_ENV) == name:
        print(f"paused at {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)


def check_writable_folder(folder: str | Path, what: str = "--out") -> None:
    """Raise ``UnwritableError`` unless ``folder`` is, or can be created as, a writable folder.
    Leaves nothing behind: a probe is written and removed in the folder, or in the nearest
    existing folder above it."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        reason = "is a file" if existing == folder else f"is under {existing}, which is a file"
        raise UnwritableError(f"{what} {folder} {reason}, not a folder: choose another path")
    try:
        with tempfile.TemporaryDirectory(dir=existing, prefix=".lcd-bayes-probe-"):
            pass
    except OSError as error:
        raise UnwritableError(
            f"{what} {folder} cannot be written ({existing}: {error.strerror or error}): "
                         "choose a folder you can write to") from None
