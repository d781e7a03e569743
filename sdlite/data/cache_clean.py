"""Cleaning a cache folder (sdlite/data/cache.py): what no run has used for a while, and the leftovers.

A key names everything that produced its entry, so an entry is never wrong, only unused: its image was
removed, or the run moved to another VAE, resolution or text encoder. Each fill marks the shards it
reads as used (their time of change, ``ShardIndex.touch``), and a shard holds the entries of one fill,
made by one model, so a shard's time says when a run last needed it. ``clean_cache`` removes:

- shards unused for ``keep_days`` (a run that needs them again computes them again);
- shards that do not read (cut short, overwritten): never read as data, but they take room;
- ``.tmp`` files of writers stopped mid-write (older than an hour: a live writer renames in seconds);
- entries of the cache's earlier layout (a file per entry under ``ab/``, a file per image under
  ``decoded/ab/``), which this version never reads;

and merges the per-writer files of decoded images into one. Nothing else is touched: only files whose
names are the cache's own, under its ``shards/`` and ``decoded/`` or in the earlier layout's places, so
a cache_dir pointed at the wrong folder loses nothing else. Run it while no run fills the cache.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from sdlite.data.shards import SHARD_NAME, KeyLog, writer_name

DAY = 86400.0
TMP_AGE = 3600.0  # seconds: a .tmp this old belongs to a writer that was stopped
TMP_NAME = re.compile(SHARD_NAME.pattern.removesuffix("$") + r"\.tmp$")
HEX2, HEX64 = re.compile(r"^[0-9a-f]{2}$"), re.compile(r"^[0-9a-f]{64}$")
LEGACY_ENTRY = re.compile(r"^[0-9a-f]{64}\.safetensors(\.[0-9a-f]{32}\.tmp)?$")


@dataclass
class Cleaned:
    """What ``clean_cache`` removed: the files and their bytes."""

    files: list[Path] = field(default_factory=list)
    bytes: int = 0

    def remove(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:  # another cleaner was first
            return
        self.files.append(path)
        self.bytes += size


def reads(path: Path) -> bool:
    try:
        with safe_open(path, "pt"):
            return True
    except (OSError, SafetensorError):
        return False


def clean_cache(root: str | Path, keep_days: float = 30.0, now: float | None = None) -> Cleaned:
    """Remove from cache folder ``root`` what is stale or left over (see the module docstring)."""
    root, now = Path(root), time.time() if now is None else now
    cleaned = Cleaned()
    shards = root / "shards"
    for path in sorted(shards.iterdir()) if shards.is_dir() else ():
        age = now - path.stat().st_mtime
        if SHARD_NAME.match(path.name) and (age > keep_days * DAY or not reads(path)):
            cleaned.remove(path)
        elif TMP_NAME.match(path.name) and age > TMP_AGE:
            cleaned.remove(path)
    merge_decoded(root / "decoded", now, cleaned)
    for folder in (root, root / "decoded"):  # the earlier layout: root/ab/<key>.safetensors, decoded/ab/<key>
        for sub in sorted(folder.iterdir()) if folder.is_dir() else ():
            if not (sub.is_dir() and HEX2.match(sub.name)):
                continue
            legacy = LEGACY_ENTRY if folder == root else HEX64
            for path in sorted(sub.iterdir()):
                if path.is_file() and legacy.match(path.name):
                    cleaned.remove(path)
            if not any(sub.iterdir()):
                sub.rmdir()
    return cleaned


def merge_decoded(folder: Path, now: float, cleaned: Cleaned) -> None:
    """The decoded-image records of every writer no longer appending (an hour idle) as one file."""
    idle = [p for p in folder.glob("*.keys") if now - p.stat().st_mtime > TMP_AGE] if folder.is_dir() else []
    if len(idle) < 2:
        return
    records = set()
    for path in idle:
        data = path.read_bytes()
        whole = len(data) - len(data) % KeyLog.RECORD
        records.update(data[i : i + KeyLog.RECORD] for i in range(0, whole, KeyLog.RECORD))
    target = folder / f"{writer_name()}.keys"
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(b"".join(sorted(records)))
    os.replace(tmp, target)  # the records are in the new file before any old one goes
    for path in idle:
        cleaned.remove(path)


def run(args: argparse.Namespace) -> int:
    """``sdlite data clean-cache``: clean a cache folder, one line of what was removed."""
    root = Path(args.cache_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"cache folder {str(root)!r} does not exist")
    cleaned = clean_cache(root, args.keep_days)
    print(f"{root}: removed {len(cleaned.files)} files, {cleaned.bytes / 2**20:.1f} MiB")
    return 0
