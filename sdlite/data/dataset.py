"""Training rows of (image, caption) read through ``datasets``, and the transforms of one image.

Sources, each with an image column and a caption column (``image`` and ``text`` by default):

- an image folder with ``metadata.jsonl`` lines ``{"file_name": "0001.png", "text": "a red circle"}``
  (datasets' ``imagefolder``; a folder with ``train/`` inside reads that split);
- a folder written by ``datasets.Dataset.save_to_disk``;
- a CSV, parquet or JSON-lines file whose image column holds paths relative to the file's folder;
- a folder of parquet shards (``part-00000.parquet`` ..., as ``write_shards`` writes them), read whole;
- WebDataset tar shards, a ``.tar`` file or a folder of them (sdlite/data/webdataset.py).

Images stay encoded in the rows (``datasets.Image(decode=False)``): the cache keys on their bytes and
a cached run never decodes them again.

An image becomes a training example by: resize (shorter side to the resolution, bicubic), crop a
square, flip left-right or not, scale to [-1, 1]. The crop is centred, or a random one drawn once per
image from (seed, index): the same crop every epoch, so that examples can be cached (as diffusers'
SDXL script does). Whether to flip is the sampler's choice per step; the cache holds both flips.

Scraped data has bad rows. ``load_rows`` reads metadata line by line (sdlite.data.files): a line
that is not UTF-8 or not JSON, a caption that is not text, an image path outside the data folder is
named by file and line; so is, in a folder read without metadata, a file that links out of it or whose
name is not UTF-8. ``sdlite.data.cleaning.clean_rows`` then checks every row before training.
An image that breaks after that check (uncached runs read it again every epoch) is replaced and
listed (``TrainingExamples``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.data_files import EmptyDatasetError
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image

from sdlite.data.decoding import check_aspect, decode_image, pixel_limit, why_unusable
from sdlite.data.files import (
    MAX_FILE_BYTES,
    DataError,
    listed_file_problem,
    metadata_table,
    read_file,
    resolve_in,
    shown,
)
from sdlite.data.webdataset import tar_shards, webdataset_rows

TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}
# Cached latents and embeddings kept in memory after their first read, per process (and per DataLoader
# worker): a small data set's files are read again every epoch, and 64 reads of 8x8 latents took 20 ms,
# a tenth of a tiny model's step. 1 GiB holds 8,192 latents at 512 px (mean and std, 4x64x64 float32).
CACHE_MEMORY_BYTES = 1 << 30
# Rows of metadata that cannot be read (bad_data="skip") stay in the rows, marked here, for clean_rows
# to skip and list like a bad image: (where: "file line N", what is wrong), None on good rows.
PROBLEM, WHERE = "sdlite_problem", "sdlite_where"


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


def _metadata_files(path: Path) -> list[Path]:
    """The metadata files datasets' imagefolder reads for the train split of folder ``path``."""
    root = path / "train" if (path / "train").is_dir() else path
    return sorted(p for p in root.rglob("metadata.*") if p.suffix in (".jsonl", ".csv"))


def _rows_of_lines(
    tables: list[Path],
    root: Path,
    image_column: str,
    caption_column: str,
    bad_data: str,
    allow_outside: bool,
    image_key: str,
) -> tuple[datasets.Dataset | None, list[str]]:
    """Check every line of metadata ``tables`` (see sdlite.data.files.metadata_table).

    Returns (None, []) when every line is good (``datasets`` may read the files as they are); with
    bad lines and bad_data="error", (None, the bad lines named); with "skip", the rows built here, in
    file order as imagefolder builds them, the bad ones marked for clean_rows to skip and list.
    """
    table, problems = metadata_table(tables, root, image_key, allow_outside, caption_column)
    if not problems or bad_data != "skip":
        return None, problems
    text = datasets.Value("string")
    table = {image_column: table["image"], caption_column: table["caption"], PROBLEM: table["problem"],
             WHERE: table["where"]}  # fmt: skip
    features = datasets.Features(
        {image_column: datasets.Image(decode=False), caption_column: text, PROBLEM: text, WHERE: text}
    )
    return datasets.Dataset.from_dict(table, features=features), problems


def load_rows(
    source: str | Path,
    image_column: str = "image",
    caption_column: str = "text",
    bad_data: str = "error",
    allow_outside: bool = False,
) -> datasets.Dataset:
    """The rows of a data source (see the module docstring), images left encoded.

    Metadata (``metadata.jsonl`` / ``.csv`` of an image folder, a JSON-lines or CSV table) is read line
    by line first: a line that is not UTF-8 or not JSON, a caption that is not text, an image path
    outside the data folder (unless ``allow_outside``) is a DataError naming the file and line, or
    with bad_data="skip" a row that clean_rows skips and lists.
    """
    path = Path(source)
    rows = None
    if path.is_dir() and _is_saved_dataset(path):
        rows = datasets.load_from_disk(str(path))
        if isinstance(rows, datasets.DatasetDict):
            rows = rows["train"]
    elif path.is_dir() and _parquet_shards(path) and not _metadata_files(path):
        rows = datasets.load_dataset("parquet", data_files=_parquet_shards(path), split="train")
        rows = _absolute_paths(rows, path.resolve(), image_column, allow_outside)
    elif tar_shards(path) and not (path.is_dir() and _metadata_files(path)):
        rows = webdataset_rows(path, image_column, caption_column, bad_data, PROBLEM, WHERE)
    elif path.is_dir():
        rows, problems = _rows_of_lines(_metadata_files(path), path, image_column, caption_column, bad_data,
                                        allow_outside, "file_name")  # fmt: skip
        _raise_for(problems, bad_data)
        if rows is None:
            rows = _image_folder(path, image_column, bad_data, allow_outside)
    elif path.is_file() and path.suffix.lower() in TABLE_FORMATS:
        folder = path.resolve().parent  # relative image paths are relative to the table
        lines = path.suffix.lower() in (".csv", ".jsonl") or (
            path.suffix.lower() == ".json" and path.read_bytes()[:64].lstrip()[:1] != b"["
        )
        if lines:
            rows, problems = _rows_of_lines([path], folder, image_column, caption_column, bad_data,
                                            allow_outside, image_column)  # fmt: skip
            _raise_for(problems, bad_data)
        if rows is None:
            builder = TABLE_FORMATS[path.suffix.lower()]
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
            rows = _absolute_paths(rows, folder, image_column, allow_outside)
    else:
        raise DataError(
            f"data source {str(path)!r} is neither a folder (images with metadata.jsonl, a dataset saved "
            f"with save_to_disk, parquet or webdataset .tar shards) nor a {'/'.join(TABLE_FORMATS)}/.tar file"
        )
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if column not in rows.column_names:
            raise DataError(
                f"{str(path)!r} has no {kind} column {column!r}; its columns are {rows.column_names} "
                f"(choose with --{kind}_column)"
            )
    if len(rows) == 0:
        raise DataError(f"{str(path)!r} holds no rows")
    return rows.cast_column(image_column, datasets.Image(decode=False))


def _image_folder(path: Path, image_column: str, bad_data: str, allow_outside: bool) -> datasets.Dataset:
    """datasets' imagefolder of ``path``. It follows links and cannot hold a file name that is not
    UTF-8 (pyarrow's strings are UTF-8), so without a metadata file (whose lines were checked) the
    folder's files are listed first: those that may not be read (``listed_file_problem``) stop the run,
    or with bad_data="skip" become marked rows that clean_rows skips and lists."""
    readable = set(ImageFolder.EXTENSIONS)  # what imagefolder reads (not hidden files)
    listed = [] if _metadata_files(path) else sorted(
        p for p in path.rglob("*") if p.suffix.lower() in readable and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )  # fmt: skip
    refused = [(shown(p), why) for p in listed if (why := listed_file_problem(p, path, allow_outside))]
    _raise_for([f"{name}: {why}" for name, why in refused], bad_data)
    good = [str(p) for p in listed if not listed_file_problem(p, path, allow_outside)]
    if refused and not good:  # nothing to read: clean_rows lists them all and stops the run
        rows: dict[str, list] = {"image": []}
    else:
        try:
            files = {"data_files": good} if refused else {"data_dir": str(path)}
            rows = datasets.load_dataset("imagefolder", split="train", **files).cast_column(
                "image", datasets.Image(decode=False)
            )
        except EmptyDatasetError:
            raise DataError(
                f"data folder {str(path)!r} holds no images: put images there, each with a caption file "
                'beside it (0001.png, 0001.txt) or named in a metadata.jsonl of lines {"file_name": '
                '"0001.png", "text": "a caption"}'
            ) from None
        if not refused:
            return rows
        features = rows.features
        rows = {c: list(rows[c]) for c in rows.column_names}
    # The refused files as rows marked as _rows_of_lines marks bad lines, after the good ones.
    text = datasets.Value("string")
    features = datasets.Features({**(features if good else {"image": datasets.Image(decode=False)}),
                                  PROBLEM: text, WHERE: text})  # fmt: skip
    columns = {c: values + [None] * len(refused) for c, values in rows.items()}
    columns[PROBLEM] = [None] * len(good) + [why for _, why in refused]
    columns[WHERE] = [None] * len(good) + [name for name, _ in refused]
    return datasets.Dataset.from_dict(columns, features=features)


def _parquet_shards(folder: Path) -> list[str]:
    """The parquet files directly in a folder, in name order (the order of a stream of them)."""
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".parquet")


def _absolute_paths(rows: datasets.Dataset, folder: Path, image_column: str, allow_outside: bool):
    """A table's image paths (parquet, a JSON array: lines are checked before) made absolute, relative
    ones read from ``folder``; a path outside it stops the run unless ``allow_outside``."""
    feature = rows.features.get(image_column)
    if isinstance(feature, datasets.Value) and "string" in feature.dtype:
        outside = [w for p in rows[image_column] if (w := resolve_in(folder, p, allow_outside)[1])]
        _raise_for(outside, "error", "or allow_outside_paths if you trust the table")
        absolute = [str(resolve_in(folder, p, True)[0]) for p in rows[image_column]]
        rows = rows.remove_columns(image_column).add_column(image_column, absolute)
    return rows


def _raise_for(problems: list[str], bad_data: str, fix: str = "or set bad_data to skip to train without "
               "them (they are listed)") -> None:  # fmt: skip
    if problems and bad_data != "skip":
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DataError(f"{len(problems)} rows of metadata cannot be read: {shown}. Fix them, {fix}")


def image_bytes(entry: dict, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The encoded bytes of an undecoded ``datasets.Image`` entry: stored bytes, else the file's (a
    regular file of at most ``max_bytes``: see sdlite.data.files.read_file)."""
    if entry.get("bytes"):
        return entry["bytes"]
    return read_file(entry["path"], max_bytes)


def caption_text(value) -> str:
    """A caption cell as text; of a list of captions, the first."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    return "" if value is None else str(value)


@dataclass(frozen=True)
class ImageTransform:
    """Encoded image -> (3, R, R) float tensor in [-1, 1]: resize, square crop, optional flip."""

    resolution: int
    random_crop: bool = False
    seed: int = 0
    max_pixels: int | None = None  # the most pixels an image may declare; None: pixel_limit(resolution)

    def resized_size(self, size: tuple[int, int]) -> tuple[int, int]:
        scale = self.resolution / min(size)
        return tuple(max(self.resolution, round(s * scale)) for s in size)

    def crop_box(self, size: tuple[int, int], index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image; a random crop is a function of (seed, index)."""
        w, h = self.resized_size(size)
        r = self.resolution
        if self.random_crop:
            rng = np.random.default_rng([self.seed, index])
            left, top = int(rng.integers(0, w - r + 1)), int(rng.integers(0, h - r + 1))
        else:
            left, top = (w - r) // 2, (h - r) // 2
        return left, top, left + r, top + r

    def __call__(self, data: bytes, index: int, flip: bool = False) -> torch.Tensor:
        image = decode_image(data, pixel_limit(self.resolution, self.max_pixels))
        check_aspect(image.size)  # before the resize: a thin strip would be scaled to a huge one
        box = self.crop_box(image.size, index)
        size = self.resized_size(image.size)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        if box != (0, 0, *size):
            image = image.crop(box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        return pixels.flip(-1) if flip else pixels  # (3, R, R)


class BadCacheEntry(DataError):
    """A cache entry that does not read (sdlite.data.cache): its shard removed when met."""


def row_name(entry, index: int) -> str:
    """How a report names a row: its image file, else its position."""
    path = entry.get("path") if isinstance(entry, dict) else None
    return str(path) if path else f"row {index}"


class TrainingExamples(torch.utils.data.Dataset):
    """Item ``(index, flip)`` -> one example as a dict of tensors.

    The latent side is ``mean`` and ``std`` of q(z|x) (C, h, w) read from the cache when
    ``latent_files`` is given (one cache entry per flip), else ``pixels`` (3, R, R) for the trainer to
    encode. The text side is ``embeds`` (L, D) from the cache when ``embed_files`` is given, else
    ``input_ids`` (L,) for the trainer to encode.

    Uncached, an image is read again at every step, and the file may have changed or broken since
    clean_rows checked it (a sync, an editor, a disk). Such an item is replaced by the next row that
    still reads of the same ``groups`` value (with aspect buckets the same bucket, so the batch still
    stacks; with DreamBooth the same side). The step keeps its batch size; the replacement is a
    function of the index alone, so every run and every worker picks the same one. The file is listed
    in ``report`` (appended to, as clean_rows' rows are: "file, problem, what was done") and through
    ``log``, once per file. A cache entry that no longer reads is met the same way: removed (the next
    start computes it again), listed, and its row replaced by one whose entries read.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        image_column: str,
        transform: ImageTransform,
        input_ids: torch.Tensor,
        latent_files: list[list] | None = None,  # CacheEntry per row and flip (sdlite.data.cache)
        embed_files: list | None = None,  # CacheEntry per row
        report: str | Path | None = None,
        log: Callable[[str], None] = print,
        groups: Sequence | None = None,
    ):
        self.images = rows.select_columns([image_column])
        self.image_column, self.transform, self.input_ids = image_column, transform, input_ids
        self.latent_files, self.embed_files = latent_files, embed_files
        self.report, self.log, self.groups = report, log, groups
        self.broken: set[int] = set()  # rows found broken in this process
        self.memory: dict[object, dict[str, torch.Tensor]] = {}  # cache entry -> its tensors, see read_cached
        self.memory_bytes = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def rows_like(self, index: int):
        """Row ``index``, then the rows that may stand in for it (its group's, not found broken), in order."""
        for k in range(len(self)):
            row = (index + k) % len(self)
            if row in self.broken or (self.groups is not None and self.groups[row] != self.groups[index]):
                continue
            yield row

    def _gone(self, index: int, what: str) -> DataError:
        alike = len(self) if self.groups is None else self.groups.count(self.groups[index])
        return DataError(f"none of the {alike} {what} reads any more: the data changed after the start")

    def pixels(self, index: int, flip: bool) -> torch.Tensor:
        """(3, R, R) pixels of row ``index``, or of the next row that still reads."""
        for row in self.rows_like(index):
            entry = self.images[row][self.image_column]
            try:
                return self.transform(image_bytes(entry), row, flip)
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
                self.broken.add(row)
                self._list(row_name(entry, row), why_unusable(error))
        raise self._gone(index, "images")

    def _list(self, name: str, problem: str) -> None:
        action = "skipped (broke after the start-up check), another row trained in its place"
        self.log(f"data: {name}: {problem}; {action}")
        if self.report is not None:
            # One short append per line: O_APPEND keeps the lines of several workers whole.
            with open(self.report, "a") as f:
                f.write(f"{name}\t{problem}\t{action}\n")

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        index, flip = item
        if self.latent_files is None and self.embed_files is None:
            return {"pixels": self.pixels(index, flip), "input_ids": self.input_ids[index]}
        # A cache entry that no longer reads is removed (sdlite.data.cache: a later start computes it
        # again) and its row replaced, as an image that broke, by one whose entries read.
        for row in self.rows_like(index):
            try:
                return self.example(row, flip)
            except BadCacheEntry as error:
                self.broken.add(row)
                self._list(row_name(self.images[row][self.image_column], row), str(error))
        raise self._gone(index, "cache entries")

    def example(self, index: int, flip: bool) -> dict[str, torch.Tensor]:
        if self.latent_files is not None:
            path = self.latent_files[index][int(flip)]
            if path is None:
                raise DataError(f"example {index} was cached without its flipped image")
            example = self.read_cached(path)
        else:
            example = {"pixels": self.pixels(index, flip)}
        if self.embed_files is not None:
            example["embeds"] = self.read_cached(self.embed_files[index])["embeds"]
        else:
            example["input_ids"] = self.input_ids[index]
        return example

    def read_cached(self, entry) -> dict[str, torch.Tensor]:
        """A cache entry's tensors (a ``sdlite.data.cache.CacheEntry``), from memory after the first read
        while CACHE_MEMORY_BYTES has room. The cache is written once at start-up and only read after,
        and the loader stacks each batch into new tensors, so the kept ones are never changed.
        BadCacheEntry (its shard removed) for an entry that does not read."""
        tensors = self.memory.get(entry)
        if tensors is None:
            tensors = entry.load()
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            if self.memory_bytes + size <= CACHE_MEMORY_BYTES:
                self.memory[entry] = tensors
                self.memory_bytes += size
        return dict(tensors)
