"""Writes that survive a crash: a file's bytes reach the disk before the rename that publishes it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush a file's (or a folder's entries') writes to the disk: without it, a crash after the rename
    can leave the new name pointing at a file that never got its bytes."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
