"""Files that appear whole or not at all: written under a temporary name, then renamed.

A process killed while writing ``out.npz`` leaves ``out.npz.incomplete-<pid>`` beside
it, never a file named ``out.npz`` that only looks whole; a write that fails (a full
disk) removes its temporary file. Readers never see a partial file, and two
processes writing the same file never write into one temporary file.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator
from typing import BinaryIO

INCOMPLETE = ".incomplete-"  # in the temporary file's name: <name>.incomplete-<pid>


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file open for writing that becomes ``path`` when the block ends without error.

    The data reaches the disk (fsync) before the rename, so that ``path`` holds the
    old content or the new one even after the machine stops, and so that a full
    disk on a filesystem that reports it late (NFS) fails here, not in a reader.
    """
    path = pathlib.Path(path)
    tmp = path.with_name(f"{path.name}{INCOMPLETE}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; after the rename it is gone
