"""A disk cache of what the frozen models compute from the training data: VAE latents, text embeddings.

Each entry is keyed by the SHA-256 of everything that produced it:

- latents of one image and one flip: the image's bytes, the decoder's version, the resolution, the crop
  box, the flip, and the VAE's fingerprint (its config and weights, so also their dtype). Stored:
  ``mean`` and ``std`` of the encoder's posterior q(z|x), each (C, h, w), before the scaling and shift
  factors (which the fingerprint leaves out, so a VAE whose factors alone changed keeps its cache);
  ``sample_latents`` turns them into the U-Net's x_0 through ``sdlite.latents.to_latents``;
- text embeddings of one caption: its token ids and the text encoder's fingerprint. Stored:
  ``embeds`` (L, D), the encoder's last hidden state. For SDXL (``cache_text_xl``) one entry of both
  captions' token ids and both encoders' fingerprints: ``embeds`` (L, d1 + d2), both encoders'
  penultimate states concatenated, and ``pooled`` (p,), encoder 2's projected embedding
  (``sdlite.conditioning_xl``, what the SDXL pipeline computes for a prompt);
- ``decoded/``: the digests of images (by their bytes and the decoder's version) that decoded whole,
  so that the check of every image before training (``sdlite.data.cleaning.clean_rows``) decodes
  each only once.

Entries live in shards of about a thousand (``sdlite.data.shards``: each process writes files of its
own and publishes each whole, readers merge the shards' headers), so a million images make a few
thousand files, and many processes on many machines can fill one folder. A key changes whenever
anything that shapes the tensor changes, so a stale entry is never read, and unchanged data hits in
every later run, whatever its output folder. Entries are never rewritten: changed inputs make new keys;
``sdlite.data.cache_clean.clean_cache`` removes the shards no run has used for a while. A shard that
does not read is named, removed and its entries computed again (``fill``); one met mid-run likewise
(``TrainingExamples``).

Why the mean and std rather than one sample: diffusers' script draws z ~ q(z|x) afresh at every step
(``latent_dist.sample()``). Keeping the distribution keeps exactly that, so cached training optimises
the same objective as uncached training, for twice the storage of one sample; a stored sample would
freeze one draw of the VAE's noise for the whole run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from sdlite.conditioning_xl import encode_ids_xl
from sdlite.data.dataset import BadCacheEntry, ImageTransform, image_bytes
from sdlite.data.decoding import DECODER, image_size
from sdlite.data.files import DataError, shown
from sdlite.data.shards import SHARD_BYTES, SHARD_ENTRIES, KeyLog, ShardIndex, ShardWriter
from sdlite.latents import to_latents

# Config entries that do not change what a model computes from its input.
NOT_COMPUTED = ("scaling_factor", "shift_factor", "force_upcast")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(module: torch.nn.Module, ignore: Sequence[str] = NOT_COMPUTED) -> str:
    """SHA-256 of a model's config (less ``ignore`` and private keys) and of every weight's bytes."""
    h = hashlib.sha256()
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    public = {k: v for k, v in config.items() if not k.startswith("_") and k not in ignore}
    h.update(json.dumps(public, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def latent_key(
    image_digest: str, resolution: int, box: Sequence[int], flip: bool, vae_fingerprint: str
) -> str:
    recipe = f"{image_digest}|{resolution}|{tuple(box)}|{int(flip)}|{vae_fingerprint}|decoder{DECODER}"
    return digest(f"latent|{recipe}".encode())


def text_key(input_ids: torch.Tensor, text_fingerprint: str) -> str:
    ids = ",".join(str(i) for i in input_ids.tolist())
    return digest(f"text|{ids}|{text_fingerprint}".encode())


class DecodedImages:
    """The images (by content) that decode_image has read whole, kept under ``root/decoded`` (a
    ``KeyLog``), so that a later run's check (clean_rows) need not decode them again."""

    def __init__(self, root: str | Path):
        self.log = KeyLog(Path(root) / "decoded")

    @staticmethod
    def key(data: bytes) -> bytes:
        return hashlib.sha256(data + f"|decoder{DECODER}".encode()).digest()

    def __contains__(self, data: bytes) -> bool:
        return self.key(data) in self.log

    def add(self, data: bytes) -> None:
        try:
            self.log.add(self.key(data))
        except OSError:  # a full disk: a record not kept costs one decoding in a later run, not this run
            pass


class CacheWriteError(DataError, OSError):
    """A cache entry could not be written (a full disk, a read-only folder): nothing was lost. An
    OSError, as the failed write was, and a DataError, as every error of the data's preparation is."""


@dataclass(frozen=True)
class CacheEntry:
    """One entry of a TensorCache, what a training example reads (``TrainingExamples``): found in its
    shard when first read, so it may be handed out before another process has written it."""

    key: str
    cache: TensorCache = field(compare=False, repr=False)

    def load(self) -> dict[str, torch.Tensor]:
        """The entry's tensors; BadCacheEntry (its shard removed, so that the next start computes its
        entries again) if it does not read."""
        return self.cache.read(self.key)


class TensorCache:
    """Entries (key -> named tensors) in safetensors shards under ``root/shards`` (sdlite/data/shards.py)."""

    def __init__(self, root: str | Path, log: Callable[[str], None] = print,
                 shard_entries: int = SHARD_ENTRIES, shard_bytes: int = SHARD_BYTES):  # fmt: skip
        self.root, self.log = Path(root), log
        self.index = ShardIndex(self.root / "shards", log)
        self.shard_entries, self.shard_bytes = shard_entries, shard_bytes

    def __contains__(self, key: str) -> bool:
        if key not in self.index:
            self.index.refresh()
        return key in self.index

    def shard(self, key: str) -> Path:
        """The shard file that holds the entry (KeyError if none does)."""
        if key not in self:
            raise KeyError(f"no cache entry {key} under {shown(self.root)!r}")
        return self.index.shard_of(key)

    def entry(self, key: str) -> CacheEntry:
        return CacheEntry(key, self)

    def load(self, key: str) -> dict[str, torch.Tensor]:
        """The entry's tensors, from the shards as they are now (KeyError if none holds it)."""
        if key not in self:
            raise KeyError(f"no cache entry {key} under {shown(self.root)!r}")
        return self.index.load(key)

    def read(self, key: str) -> dict[str, torch.Tensor]:
        """``load`` for a training example: BadCacheEntry, naming the shard, for an entry that is
        missing or whose shard does not read (that shard removed: ours, and not whole)."""
        try:
            return self.load(key)
        except KeyError as error:
            raise BadCacheEntry(f"cache entry {key} is in no shard of {shown(self.root)!r}; it is computed "
                                "again when a run starts") from error  # fmt: skip
        except (OSError, SafetensorError) as error:
            shard = self.index.shard_of(key)
            shard.unlink(missing_ok=True)
            self.index.forget()
            raise BadCacheEntry(
                f"cache entry {key} in {shown(shard)} does not read ({type(error).__name__}: {error}); its "
                "shard removed, its entries are computed again when a run starts"
            ) from error

    def save(self, key: str, tensors: dict[str, torch.Tensor], what: str = "cache entries") -> None:
        """Write one entry (see ``save_all``)."""
        self.save_all([(key, tensors)], what)

    def save_all(
        self, entries: Sequence[tuple[str, dict[str, torch.Tensor]]], what: str = "cache entries"
    ) -> None:
        """Write (key, tensors) entries into shards published whole (see sdlite.data.shards)."""
        writer = self.writer()
        for key, tensors in entries:
            self.write(writer, what, key, tensors)
        self.write(writer, what)

    def writer(self) -> ShardWriter:
        return ShardWriter(self.index.folder, self.shard_entries, self.shard_bytes)

    def write(self, writer: ShardWriter, what: str, key: str | None = None, tensors=None) -> None:
        """Hand the writer one entry, or with none publish what it holds; a published shard joins the
        index. CacheWriteError, naming ``what``, when it cannot be written."""
        try:
            shard = writer.publish() if key is None else writer.add(key, tensors)
        except (OSError, SafetensorError) as error:
            raise CacheWriteError(
                f"could not write {what} to the cache {shown(self.root)!r} ({type(error).__name__}: "
                f"{error}). Nothing was lost: the cache is filled before the first training step, the "
                "entries already written are whole and will be reused, and the partial files were removed. "
                "Free disk space there (or fix the folder's permissions, or set cache_dir to a disk with "
                "room), then start again"
            ) from error
        if shard is not None:
            self.index.refresh()

    def fill(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], dict[str, torch.Tensor]],
        batch_size: int = 32,
        rank: int = 0,
        world_size: int = 1,
        progress: Callable[[int], None] | None = None,
        what: str = "cache entries",
    ) -> int:
        """Compute and store the entries of ``keys`` that are missing; returns how many (as this
        process saw them). ``what`` names the entries in an error ("latents").

        ``compute(positions)`` returns a dict of batched tensors for those positions of ``keys``. With
        several processes each computes its share of the missing entries; the caller waits for all
        of them before reading. A fill that is stopped keeps the shards it published.
        """
        self.index.refresh()
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        missing = [i for key, i in first.items() if key not in self.index]
        if rank == 0:  # what this run uses is not stale (clean_cache): one process says so
            self.index.touch(first)
        # Each key has one owner, fixed by the key itself, so processes that look at different times
        # (while others write) still split the work without gaps or overlaps.
        mine = [i for i in missing if int(keys[i][:8], 16) % world_size == rank]
        writer = self.writer()
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = compute(chunk)
            for j, i in enumerate(chunk):
                self.write(writer, what, keys[i], {name: value[j] for name, value in batch.items()})
            if progress is not None:
                progress(len(chunk))
        self.write(writer, what)  # the last, short shard
        return len(missing)


@torch.no_grad()
def vae_moments(vae, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of q(z|x) for (B, 3, H, W) pixels in [-1, 1], as float32 (B, C, h, w)."""
    posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    return {"mean": posterior.mean.float(), "std": posterior.std.float()}


def sample_latents(moments: dict[str, torch.Tensor], noise: torch.Tensor, vae_config) -> torch.Tensor:
    """x_0 from moments of q(z|x) (a cache entry or ``vae_moments``): z = mean + std * noise, the draw
    diffusers' ``latent_dist.sample()`` makes, then scaled and shifted by ``sdlite.latents.to_latents``."""
    return to_latents(moments["mean"] + moments["std"] * noise, vae_config)


@torch.no_grad()
def text_embeddings(text_encoder, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The text encoder's last hidden state for (B, L) token ids, as float32 (B, L, D)."""
    return {"embeds": text_encoder(input_ids.to(text_encoder.device))[0].float()}


def cache_latents(
    cache: TensorCache,
    rows,
    image_column: str,
    transform: ImageTransform,
    vae,
    flips: Sequence[bool] = (False,),
    batch_size: int = 32,
    rank: int = 0,
    world_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[list[CacheEntry | None]], int]:
    """Make sure every row's latents are cached for each of ``flips``.

    Returns the entries (``CacheEntry``) per row as ``[unflipped, flipped]`` (None where that flip is not
    cached) and the number of entries that had to be computed (0: every entry hit).
    """
    vae_fingerprint = fingerprint(vae)
    images = rows.select_columns([image_column])
    keys, where = [], []  # where: (row, flip) of each key
    entries = (entry for chunk in images.iter(batch_size=256) for entry in chunk[image_column])
    for index, entry in enumerate(entries):
        data = image_bytes(entry)
        box, image_digest = transform.crop_box(image_size(data), index), digest(data)
        for flip in flips:
            keys.append(latent_key(image_digest, transform.resolution, box, flip, vae_fingerprint))
            where.append((index, flip))

    def compute(positions: list[int]) -> dict[str, torch.Tensor]:
        pixels = [
            transform(image_bytes(images[where[p][0]][image_column]), where[p][0], where[p][1])
            for p in positions
        ]
        return vae_moments(vae, torch.stack(pixels))

    missing = cache.fill(keys, compute, batch_size, rank, world_size, progress, "latents")
    files: list[list[CacheEntry | None]] = [[None, None] for _ in range(len(images))]
    for key, (index, flip) in zip(keys, where):
        files[index][int(flip)] = cache.entry(key)
    return files, missing


def cache_text(
    cache: TensorCache,
    input_ids: torch.Tensor,
    text_encoder,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[CacheEntry], int]:
    """Make sure the embeddings of every row's token ids (N, L) are cached; returns (files, computed)."""
    text_fingerprint = fingerprint(text_encoder)
    keys = [text_key(ids, text_fingerprint) for ids in input_ids]
    missing = cache.fill(
        keys,
        lambda positions: text_embeddings(text_encoder, input_ids[positions]),
        batch_size,
        rank,
        world_size,
        what="text embeddings",
    )
    return [cache.entry(key) for key in keys], missing


@torch.no_grad()
def text_embeddings_xl(
    text_encoder, text_encoder_2, input_ids: torch.Tensor, input_ids_2: torch.Tensor
) -> dict[str, torch.Tensor]:
    """SDXL's condition of (B, L) token ids of each tokenizer, as float32: ``embeds`` (B, L, d1 + d2)
    and ``pooled`` (B, p) (``sdlite.conditioning_xl.encode_ids_xl``)."""
    embeds, pooled = encode_ids_xl(text_encoder, text_encoder_2, input_ids, input_ids_2)
    return {"embeds": embeds.float(), "pooled": pooled.float()}


def cache_text_xl(
    cache: TensorCache,
    input_ids: torch.Tensor,
    input_ids_2: torch.Tensor,
    text_encoder,
    text_encoder_2,
    batch_size: int = 64,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[CacheEntry], int]:
    """``cache_text`` for SDXL: each row's (N, L) ids of both tokenizers -> one file of ``embeds`` and
    ``pooled``; returns (files, computed)."""
    prints = f"xl|{fingerprint(text_encoder)}|{fingerprint(text_encoder_2)}"
    keys = [text_key(torch.cat([a, b]), prints) for a, b in zip(input_ids, input_ids_2)]
    missing = cache.fill(
        keys,
        lambda positions: text_embeddings_xl(
            text_encoder, text_encoder_2, input_ids[positions], input_ids_2[positions]
        ),
        batch_size,
        rank,
        world_size,
        what="text embeddings",
    )
    return [cache.entry(key) for key in keys], missing
