"""Training examples streamed from sharded files, for data sets larger than the disk or the memory.

The source is read through ``datasets.load_dataset(..., streaming=True)``: rows arrive shard by shard,
nothing is indexed, copied or cached, so the shards may live on a mounted bucket or a network disk.

    data/shards/part-00000.parquet ...   parquet with an image column of {"bytes", "path"} (``write_shards``)
    data/shards/part-00000.jsonl ...     JSON lines whose image column holds paths relative to the folder
    data/shards/part-00000.tar ...       webdataset tars (columns are the file extensions: png, txt, ...)
    data/images/                          an image folder with metadata.jsonl (datasets' imagefolder)

The order of one process's examples:
- epoch e is the stream shuffled by (seed, e): datasets shuffles the order of the shards and then the
  rows through a buffer of ``shuffle_buffer`` rows (an approximate shuffle: a row moves at most about
  that far from its shard order);
- ``datasets.distributed.split_dataset_by_node`` gives each process its own shards (every
  ``num_processes``-th one; with a shard count that is not a multiple of the process count, every
  ``num_processes``-th row of the whole stream instead, each process reading all shards);
- epochs follow each other without a break, so a process never runs dry and every optimizer step has
  a full global batch. The processes' shares may differ in length, so they may change epochs at
  different steps; each still sees each of its rows once per epoch.

What differs from the map-style path (``TrainingExamples`` with ``sdlite.data.samplers.StepSampler``):
latents and text embeddings are encoded every step (no cache: the data may not fit on the disk);
which rows form a step's global batch depends on the number of processes; and resuming at step s
re-reads (without decoding) the s x accumulation x batch rows each process had consumed, to land on
the same row with the same shuffle buffer. So a resumed run repeats an uninterrupted one exactly when
it has the same processes, seed, batch and shards; reading those rows again costs I/O, not decoding.
"""

from __future__ import annotations

import copy
import glob
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node

from sdlite.data.dataset import DataError, ImageTransform, caption_text, image_bytes, load_rows
from sdlite.data.files import read_file, resolve_in
from sdlite.tokenizer import token_ids

SHARD_FORMATS = {
    ".parquet": "parquet",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tar": "webdataset",
}


def shard_files(source: str | Path) -> tuple[str, list[str]]:
    """The ``datasets`` builder and the sorted shard files of a folder, a glob or one file."""
    path = Path(source)
    if path.is_dir() and (path / "metadata.jsonl").is_file():
        return "imagefolder", [str(path)]
    if path.is_dir():
        files = [p for p in path.iterdir() if p.suffix.lower() in SHARD_FORMATS]
    else:
        files = [Path(p) for p in glob.glob(str(path))]
    kinds = {SHARD_FORMATS.get(p.suffix.lower()) for p in files}
    if not files or len(kinds) != 1 or None in kinds:
        raise DataError(
            f"streaming source {str(path)!r} must be shards of one kind ({', '.join(SHARD_FORMATS)}) as a "
            "folder, a glob or a file, or an image folder with metadata.jsonl; found "
            f"{sorted(map(str, files))[:5]}"
        )
    return kinds.pop(), sorted(str(p) for p in files)


def load_stream(
    source: str | Path, image_column: str = "image", caption_column: str = "text", allow_outside: bool = False
) -> datasets.IterableDataset:
    """The rows of a sharded source as a ``datasets.IterableDataset``, images left encoded. Image paths
    in the shards must lie in the shards' folder unless ``allow_outside`` (checked as rows arrive: a
    path outside stops the stream with a DataError naming it)."""
    builder, files = shard_files(source)
    if builder == "imagefolder":
        stream = datasets.load_dataset(builder, data_dir=files[0], split="train", streaming=True)
    else:
        stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True)
    features = stream.features or {}
    for kind, column in (("image", image_column), ("caption", caption_column)):
        if features and column not in features:
            raise DataError(
                f"{str(source)!r} has no {kind} column {column!r}; its columns are {list(features)} "
                f"(choose with --{kind}_column)"
            )
    feature = features.get(image_column)
    if isinstance(feature, datasets.Image):
        stream = stream.cast_column(image_column, datasets.Image(decode=False))
    elif isinstance(feature, datasets.Value) and "string" in feature.dtype:
        root = Path(files[0]).resolve().parent  # paths in the shards are relative to their folder

        def inside(row: dict) -> dict:
            path, why = resolve_in(root, row[image_column], allow_outside)
            if why:
                raise DataError(f"streaming source {str(source)!r}: {why}")
            return {image_column: str(path)}

        stream = stream.map(inside)
    return stream


def write_shards(
    source: str | Path,
    out: str | Path,
    num_shards: int,
    image_column: str = "image",
    caption_column: str = "text",
    seed: int | None = 0,
) -> list[Path]:
    """Write any ``load_rows`` source as ``num_shards`` parquet files holding the image bytes
    (``part-00000.parquet`` ...), the layout ``load_stream`` reads fastest. The rows are shuffled by
    ``seed`` first (None: kept in order), so that each shard is a sample of the whole: the stream's
    shuffle only mixes rows a buffer apart."""
    rows = load_rows(source, image_column, caption_column)
    rows = rows if seed is None else rows.shuffle(seed=seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    paths = []
    for k in range(num_shards):
        part = rows.shard(num_shards, k, contiguous=True)
        table = {
            "image": [{"bytes": image_bytes(e), "path": None} for e in part[image_column]],
            "text": [caption_text(c) for c in part[caption_column]],
        }
        paths.append(out / f"part-{k:05d}.parquet")
        datasets.Dataset.from_dict(table, features=features).to_parquet(str(paths[-1]))
    return paths


def parquet_rows(source: str | Path) -> int | None:
    """The row count of parquet shards, read from their footers; None for other formats."""
    builder, files = shard_files(source)
    if builder != "parquet":
        return None
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


class StreamingExamples(torch.utils.data.IterableDataset):
    """This process's micro-batches, ``{"pixels": (B, 3, R, R), "input_ids": (B, L)}``, from a stream.

    It stands in for ``sdlite.data.samplers.StepSampler`` too: ``global_batch`` and ``positions(micro)`` say
    which slice of a step's global random draws (noise, timesteps) this process's micro-batch takes.
    Build the DataLoader with ``loader``; micro-batch k of the process comes from worker k mod W, in
    order, so the batches do not depend on the number of workers.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        image_column: str,
        caption_column: str,
        transform: ImageTransform,
        tokenizer,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        accumulation_steps: int = 1,
        random_flip: bool = False,
        shuffle_buffer: int = 1000,
        num_items: int | None = None,
    ):
        self.stream, self.image_column, self.caption_column = stream, image_column, caption_column
        self.transform, self.tokenizer, self.batch_size, self.seed = transform, tokenizer, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps, self.random_flip = accumulation_steps, random_flip
        self.num_items = num_items  # rows in the whole stream, where the shards say (for messages only)
        self.global_batch = batch_size * num_processes * accumulation_steps
        if shuffle_buffer > 1:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.share = split_dataset_by_node(stream, rank=process_index, world_size=num_processes)
        self.start_step = 0

    def positions(self, micro_step: int) -> slice:
        """This process's positions in a step's global batch at micro-step ``micro_step``."""
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    draw_positions = positions  # a micro-batch's random draws are at its own positions

    def rows(self, chunk: int = 64) -> Iterator[dict]:
        """This process's rows, epoch after epoch without end; each epoch shuffled by (seed, epoch)."""
        # datasets keeps the epoch in a tensor in shared memory, shared by every DataLoader worker (made
        # for a main process that sets the epoch of persistent workers); here each worker reads the
        # whole stream at its own pace, so one worker's set_epoch would move another's to a wrong epoch
        # and shuffle (a resumed run then drew other rows). A private copy keeps each epoch its own.
        share = copy.deepcopy(self.share)
        epoch = 0
        while True:
            share.set_epoch(epoch)
            found = False
            # .iter reads in chunks and, unlike iterating the dataset, never splits by DataLoader worker.
            for batch in share.iter(batch_size=chunk):
                images, captions = batch[self.image_column], batch[self.caption_column]
                found = found or bool(captions)
                yield from ({"image": i, "text": c} for i, c in zip(images, captions))
            if not found:
                raise DataError(f"process {self.process_index} got no rows: fewer rows than processes?")
            epoch += 1

    def example(self, row: dict, position: int) -> torch.Tensor:
        """The pixels of this process's row at ``position`` (counted from the stream's start)."""
        entry = row["image"]
        name = entry if isinstance(entry, str) else (entry or {}).get("path") or "(bytes in the shard)"
        index = position * self.num_processes + self.process_index  # unique over processes: crop seed
        flip = self.random_flip and np.random.default_rng([self.seed, index, 1]).random() < 0.5
        try:
            data = read_file(entry) if isinstance(entry, str) else image_bytes(entry)
            return self.transform(data, index, bool(flip))
        except (OSError, ValueError) as error:  # PIL's errors for a truncated or unknown image, DataError
            raise DataError(
                f"process {self.process_index}, row {position} of its stream, image {name}: {error}"
            ) from error

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = torch.utils.data.get_worker_info()
        workers, me = (worker.num_workers, worker.id) if worker else (1, 0)
        b = self.batch_size
        first = self.start_step * self.accumulation_steps  # micro-batches consumed before the resumed step
        pixels, captions = [], []
        for position, row in enumerate(self.rows()):
            k = position // b  # this process's micro-batch number
            if k < first or (k - first) % workers != me:
                continue  # another worker's batch, or consumed before the resume: read, not decoded
            pixels.append(self.example(row, position))
            captions.append(caption_text(row["text"]))
            if len(pixels) == b:
                yield {"pixels": torch.stack(pixels), "input_ids": self.tokenize(captions)}
                pixels, captions = [], []

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        return token_ids(self.tokenizer, captions)

    def loader(self, start_step: int = 0, num_workers: int = 0, pin_memory: bool = False):
        """A DataLoader of this process's micro-batches from optimizer step ``start_step`` on."""
        self.start_step = start_step
        return torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
            prefetch_factor=4 if num_workers else None, persistent_workers=False,
        )  # fmt: skip
