"""Atomic file writes: a reader (or a resumed run) sees the old file or the complete new one, never a part."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_open(path: str | os.PathLike, temporary_folder: str | os.PathLike | None = None) -> Iterator[BinaryIO]:
    """A binary file to write; it becomes `path` only when the block ends without an error.

    The data goes to a temporary file in `temporary_folder` (default: `path`'s folder; it must be on the
    same file system), is flushed to disk and renamed over `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Host and process in the name: writers on several nodes of a shared file system never collide.
    temporary = Path(temporary_folder or path.parent) / f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp"
    try:
        with open(temporary, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as file:
        file.write(data)
