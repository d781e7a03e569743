"""Many cache entries a file: the storage under ``sdlite.data.cache``.

An entry is a key (64 hex digits, see sdlite/data/cache.py) and a few named tensors. Entries are kept
in shards, safetensors files of up to ``SHARD_ENTRIES`` entries (or ``SHARD_BYTES``) under
``root/shards``, each tensor stored as ``"<key>/<name>"``: the header of each shard is its index, and
safetensors reads a tensor through a memory map of the file, so a read touches only that entry's bytes.

Why this shape, for a million images written by many processes on many machines into one folder:

- One writer, one file: a ``ShardWriter`` gathers its own entries in memory and publishes each full
  shard (and the last, short one) under a name no other writer can take, ``<host>-<pid>-<random>-<n>``,
  by writing a ``.tmp`` file, syncing it to the disk and renaming it: a shard is there whole or not at
  all, and no two writers ever write one file. Readers merge the shards' headers (``ShardIndex``).
- Resumable: a fill that is killed keeps every shard it published; a start after it computes only
  what is missing (at most one shard's worth of work is lost).
- A shard cut short (a copy interrupted, a power cut on a disk that ignores syncs) or overwritten does
  not read: safetensors checks the header against the file's size. It is named in the log, removed (it
  is ours: a shard under ``shards/``), and its entries are missing, so they are computed again. Never
  read as data.

The record of the images that decoded (``KeyLog``) is kept alike: each writer appends 32-byte digests
to a file of its own, and a torn last record (a file whose size is not a multiple of 32) is ignored.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from sdlite.data.files import shown
from sdlite.durable import fsync

SHARD_ENTRIES = 1024  # entries a shard: 1,000 images and both flips in two files
SHARD_BYTES = 256 << 20  # and at most this much: what a writer holds in memory before publishing
SHARD_NAME = re.compile(r"^[A-Za-z0-9_.-]+-\d+-[0-9a-f]{8}-\d{5}\.safetensors$")


def writer_name() -> str:
    """A name no other writer takes: the host, the process and a random part (a pid is reused)."""
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
    return f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class ShardWriter:
    """Gathers entries and publishes them as shards under ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, max_entries: int = SHARD_ENTRIES, max_bytes: int = SHARD_BYTES):
        self.folder, self.max_entries, self.max_bytes = folder, max_entries, max_bytes
        self.name = writer_name()
        self.published = 0
        self.pending: dict[str, torch.Tensor] = {}
        self.entries = self.bytes = 0

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> Path | None:
        """Hold one entry; returns the shard published when that filled one, else None."""
        for name, tensor in tensors.items():
            self.pending[f"{key}/{name}"] = tensor.detach().cpu().contiguous().clone()
            self.bytes += tensor.numel() * tensor.element_size()
        self.entries += 1
        if self.entries >= self.max_entries or self.bytes >= self.max_bytes:
            return self.publish()
        return None

    def publish(self) -> Path | None:
        """Write what is held as one shard, synced to the disk before its name appears; None when
        nothing is held. On an error nothing is published, the partial file is removed and the
        entries are dropped (a later fill computes them again)."""
        if not self.pending:
            return None
        path = self.folder / f"{self.name}-{self.published:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        tensors, self.pending, self.entries, self.bytes = self.pending, {}, 0, 0
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp)
            fsync(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # frees what the partial file took
            raise
        self.published += 1
        return path


def entry_names(shard) -> dict[str, tuple[str, ...]]:
    """key -> its tensors' names, from an open shard's header."""
    names: dict[str, list[str]] = {}
    for tensor in shard.keys():
        key, _, name = tensor.partition("/")
        names.setdefault(key, []).append(name)
    layouts: dict[tuple[str, ...], tuple[str, ...]] = {}  # one tuple for the many entries alike
    return {key: layouts.setdefault(tuple(found), tuple(found)) for key, found in names.items()}


class ShardIndex:
    """Where each entry is, merged from every shard's header under ``folder``; reads entries.

    ``refresh`` reads the shards published since the last look (by this or any other writer). A key
    held by several shards (two processes that computed it at once) reads from the first found: both
    hold the same tensors, as the key names everything that produced them.
    """

    def __init__(self, folder: Path, log: Callable[[str], None] = print):
        self.folder, self.log = folder, log
        self.where: dict[str, tuple[str, tuple[str, ...]]] = {}  # key -> (shard file name, tensor names)
        self.seen: set[str] = set()  # shard names read, good or not
        self.open: dict[str, object] = {}  # shard name -> safe_open handle (a memory map), this process's

    def __getstate__(self) -> dict:  # a DataLoader worker maps the shards again in its own process
        return {**self.__dict__, "open": {}}

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def __len__(self) -> int:
        return len(self.where)

    def shard_of(self, key: str) -> Path:
        return self.folder / self.where[key][0]

    def refresh(self) -> int:
        """Read the headers of shards not seen before; returns how many entries that added."""
        if not self.folder.is_dir():
            return 0
        names = sorted(n for n in os.listdir(self.folder) if SHARD_NAME.match(n) and n not in self.seen)
        if not names:
            return 0
        with ThreadPoolExecutor(8) as pool:  # on a network disk each open is a round trip
            headers = list(pool.map(self._header, names))
        before = len(self.where)
        for name, found in zip(names, headers):
            self.add(name, found)
        return len(self.where) - before

    def _header(self, name: str) -> dict[str, tuple[str, ...]] | None:
        path = self.folder / name
        try:
            with safe_open(path, "pt") as shard:
                return entry_names(shard)
        except FileNotFoundError:
            return None  # removed since the listing (clean_cache): nothing of it to read
        except (OSError, SafetensorError) as error:
            self.log(f"cache: {shown(path)}: unreadable shard ({error}); removed, its entries computed again")
            path.unlink(missing_ok=True)  # ours (a shard's name, in shards/) and whole or never published
            return None

    def add(self, name: str, found: dict[str, tuple[str, ...]] | None) -> None:
        """Take in one shard's entries (``entry_names``); None: a shard that does not read."""
        self.seen.add(name)
        for key, names in (found or {}).items():
            self.where.setdefault(key, (name, names))

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors (KeyError if no shard seen holds it; OSError or SafetensorError if its
        shard no longer reads)."""
        name, names = self.where[key]
        shard = self.open.get(name)
        if shard is None:
            shard = self.open[name] = safe_open(self.folder / name, "pt")
        return {n: shard.get_tensor(f"{key}/{n}") for n in names}

    def forget(self) -> None:
        """Start again from the shards on disk (after one turned out bad and was removed): an entry it
        held may be in another shard too, which the next ``refresh`` finds."""
        self.where, self.seen, self.open = {}, set(), {}

    def touch(self, keys: Iterable[str]) -> None:
        """Mark the shards holding ``keys`` as used now (their time of change), for ``clean_cache``."""
        for name in {self.where[k][0] for k in keys if k in self.where}:
            try:
                os.utime(self.folder / name)
            except OSError:  # removed meanwhile, or a read-only cache: the entries still read
                pass


class KeyLog:
    """A set of 32-byte digests kept under ``folder``: each process appends to a file of its own
    (``<writer>.keys``), a reader takes the union of every file. A record is written whole or cut short
    by a crash; a short tail is ignored. Losing a record only costs redoing what it recorded."""

    RECORD = 32

    def __init__(self, folder: Path):
        self.folder, self.keys, self.name = folder, None, None

    def __getstate__(self) -> dict:  # another process appends to a file of its own
        return {**self.__dict__, "name": None}

    def _read(self) -> set[bytes]:
        keys: set[bytes] = set()
        for path in self.folder.glob("*.keys") if self.folder.is_dir() else ():
            data = path.read_bytes()
            whole = len(data) - len(data) % self.RECORD
            keys.update(data[i : i + self.RECORD] for i in range(0, whole, self.RECORD))
        return keys

    def __contains__(self, digest: bytes) -> bool:
        if self.keys is None:
            self.keys = self._read()
        return digest in self.keys

    def add(self, digest: bytes) -> None:
        if self.name is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.name = f"{writer_name()}.keys"
        with open(self.folder / self.name, "ab", buffering=0) as f:
            f.write(digest)  # one unbuffered write: whole, or a short tail that _read ignores
        if self.keys is not None:
            self.keys.add(digest)
