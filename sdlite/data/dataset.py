"""Training rows of (image, caption) read through ``datasets``, and the transforms of one image.

Three sources, each with an image column and a caption column (``image`` and ``text`` by default):

- an image folder with ``metadata.jsonl`` lines ``{"file_name": "0001.png", "text": "a red circle"}``
  (datasets' ``imagefolder``; a folder with ``train/`` inside reads that split);
- a folder written by ``datasets.Dataset.save_to_disk``;
- a CSV, parquet or JSON-lines file whose image column holds paths relative to the file's folder.

Images stay encoded in the rows (``datasets.Image(decode=False)``): the cache keys on their bytes and
a cached run never decodes them again.

An image becomes a training example by: resize (shorter side to the resolution, bicubic), crop a
square, flip left-right or not, scale to [-1, 1]. The crop is centred, or a random one drawn once per
image from (seed, index): the same crop every epoch, so that examples can be cached (as diffusers'
SDXL script does). Whether to flip is the sampler's choice per step; the cache holds both flips.

Scraped data has bad rows. ``clean_rows`` decodes every image once, before training starts, so that
none can fail in the middle of an epoch: a file that is not a complete image (corrupt, truncated, not
an image, missing, a decompression bomb) is skipped or, with ``bad_data="error"``, stops the run;
grayscale, palette, 16-bit and transparent images are converted (``decode_image``), images smaller
than the resolution upscaled, missing captions trained as the empty caption and captions longer than
the tokenizer's limit truncated. Each kind is counted in one log line and every row listed in a report.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors.torch import load_file

TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class DataError(ValueError):
    """A data source that cannot be read as rows of images and captions."""


def _is_saved_dataset(path: Path) -> bool:
    return any((path / name).is_file() for name in ("state.json", "dataset_dict.json", "dataset_info.json"))


def load_rows(
    source: str | Path, image_column: str = "image", caption_column: str = "text"
) -> datasets.Dataset:
    """The rows of a data source (see the module docstring), images left encoded."""
    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        rows = datasets.load_from_disk(str(path))
        if isinstance(rows, datasets.DatasetDict):
            rows = rows["train"]
    elif path.is_dir():
        rows = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
    elif path.is_file() and path.suffix.lower() in TABLE_FORMATS:
        rows = datasets.load_dataset(TABLE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        feature = rows.features.get(image_column)
        if isinstance(feature, datasets.Value) and "string" in feature.dtype:
            folder = path.resolve().parent  # relative image paths are relative to the table
            rows = rows.map(lambda row: {image_column: str(folder / row[image_column])})
    else:
        raise DataError(
            f"data source {str(path)!r} is neither a folder (images with metadata.jsonl, or a dataset "
            f"saved with save_to_disk) nor a {'/'.join(TABLE_FORMATS)} file"
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


def image_bytes(entry: dict) -> bytes:
    """The encoded bytes of an undecoded ``datasets.Image`` entry: stored bytes, else the file's."""
    if entry.get("bytes"):
        return entry["bytes"]
    return Path(entry["path"]).read_bytes()


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
        image = decode_image(data)
        box = self.crop_box(image.size, index)
        size = self.resized_size(image.size)
        if size != image.size:
            image = image.resize(size, Image.BICUBIC)
        if box != (0, 0, *size):
            image = image.crop(box)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        return pixels.flip(-1) if flip else pixels  # (3, R, R)


# The version of decode_image, part of every cache key of decoded pixels; bump it when decoding changes.
# 2: 16-bit images scaled rather than clipped, transparent pixels white rather than their hidden colour.
DECODER = 2


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> an RGB image, every pixel decoded (a truncated file fails here).

    16-bit images keep their top 8 bits (PIL's own conversion would clip them to white), and
    transparent pixels become white (dropping alpha would show whatever colour they hold, often black).
    """
    image = Image.open(io.BytesIO(data))
    image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG or TIFF
        gray = np.asarray(image, dtype=np.float64) / 257
        image = Image.fromarray(gray.round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":  # floating-point TIFF: taken as [0, 1]
        image = Image.fromarray((np.asarray(image) * 255).round().clip(0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    return Image.open(io.BytesIO(data)).size


def row_name(entry, index: int) -> str:
    """How a report names a row: its image file, else its position."""
    path = entry.get("path") if isinstance(entry, dict) else None
    return str(path) if path else f"row {index}"


def check_image(entry, resolution: int, decoded=None) -> tuple[str | None, str | None]:
    """(why the row's image is unusable, what conversion it needs): either may be None. ``decoded``: a
    set-like record of image bytes known to decode (skipped here, added to when they do)."""
    if not isinstance(entry, dict) or not (entry.get("bytes") or entry.get("path")):
        return "no image", None
    try:
        data = image_bytes(entry)
        image = Image.open(io.BytesIO(data))
        mode, size = image.mode, image.size
        if decoded is None or data not in decoded:
            decode_image(data)
            if decoded is not None:
                decoded.add(data)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... on bad files
        if isinstance(e, FileNotFoundError):
            return "missing file", None
        if isinstance(e, Image.DecompressionBombError):
            return "too many pixels (decompression bomb?)", None
        if isinstance(e, UnidentifiedImageError):
            return "not an image (in no format PIL reads)", None
        return f"unreadable image ({type(e).__name__}: {str(e)[:80]})", None
    fixes = []
    if mode != "RGB":
        fixes.append(f"converted from {mode}")
    if min(size) < resolution:
        fixes.append(f"upscaled from {size[0]}x{size[1]}")
    return None, ", ".join(fixes) or None


def clean_rows(
    rows: datasets.Dataset,
    image_column: str,
    caption_column: str,
    resolution: int,
    tokenizer=None,
    bad_data: str = "skip",
    report: str | Path | None = None,
    log: Callable[[str], None] = print,
    decoded=None,
) -> datasets.Dataset:
    """The usable rows, each image decoded once to be sure (see the module docstring).

    bad_data: "skip" drops unusable rows, "error" raises DataError naming them. ``report``: a text
    file listing every row with a problem and what was done (removed when there is none). ``decoded``:
    see check_image (sdlite.data.cache.DecodedImages: a warm cache skips the decoding).
    """
    problems: list[tuple[str, str, str]] = []  # (row, problem, what was done)
    bad: list[int] = []
    counts: Counter[str] = Counter()  # one log line per kind of problem
    captions = rows[caption_column]
    limit = getattr(tokenizer, "model_max_length", None)
    entries = (e for chunk in rows.select_columns([image_column]).iter(256) for e in chunk[image_column])
    for index, (entry, caption) in enumerate(zip(entries, captions)):
        name = row_name(entry, index)
        unusable, fix = check_image(entry, resolution, decoded)
        text = caption_text(caption)
        if unusable:
            bad.append(index)
            problems.append((name, unusable, "skipped" if bad_data == "skip" else "error"))
            counts[f"unusable images ({'skipped' if bad_data == 'skip' else 'error'})"] += 1
            continue
        if fix:
            problems.append((name, fix, "kept"))
            counts["images converted or upscaled"] += 1
        if not text.strip():
            problems.append((name, "no caption", "kept, trained with the empty caption"))
            counts["rows without a caption (trained with the empty one)"] += 1
        # A token spans at least one character: only long texts need the tokenizer.
        elif limit and len(text) > limit - 2 and len(tokenizer(text, verbose=False).input_ids) > limit:
            problems.append((name, f"caption longer than {limit} tokens", "kept, truncated"))
            counts[f"captions truncated to {limit} tokens"] += 1
    if report is not None:
        report = Path(report)
        if problems:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text("".join(f"{n}\t{p}\t{a}\n" for n, p, a in problems))
        else:
            report.unlink(missing_ok=True)  # a stale list from an earlier run would mislead
    where = f" (listed in {str(report)!r})" if report is not None and problems else ""
    if bad and bad_data == "error":
        names = ", ".join(n for n, _, a in problems if a == "error")
        raise DataError(f"{len(bad)} rows have unusable images{where}: {names[:500]}; fix or remove them, "
                        "or set bad_data to skip")  # fmt: skip
    if counts:
        log(f"data: {', '.join(f'{n} {what}' for what, n in counts.items())}{where}")
    if len(bad) == len(rows):
        raise DataError(f"none of the {len(rows)} rows has a usable image{where}")
    if bad:
        keep = sorted(set(range(len(rows))) - set(bad))
        rows = rows.select(keep)
    return rows


class TrainingExamples(torch.utils.data.Dataset):
    """Item ``(index, flip)`` -> one example as a dict of tensors.

    The latent side is ``mean`` and ``std`` of q(z|x) (C, h, w) read from the cache when
    ``latent_files`` is given (one file per flip), else ``pixels`` (3, R, R) for the trainer to
    encode. The text side is ``embeds`` (L, D) from the cache when ``embed_files`` is given, else
    ``input_ids`` (L,) for the trainer to encode.
    """

    def __init__(
        self,
        rows: datasets.Dataset,
        image_column: str,
        transform: ImageTransform,
        input_ids: torch.Tensor,
        latent_files: list[list[str | None]] | None = None,
        embed_files: list[str] | None = None,
    ):
        self.images = rows.select_columns([image_column])
        self.image_column, self.transform, self.input_ids = image_column, transform, input_ids
        self.latent_files, self.embed_files = latent_files, embed_files

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, item: tuple[int, bool]) -> dict[str, torch.Tensor]:
        index, flip = item
        if self.latent_files is not None:
            path = self.latent_files[index][int(flip)]
            if path is None:
                raise DataError(f"example {index} was cached without its flipped image")
            example = load_file(path)
        else:
            data = image_bytes(self.images[index][self.image_column])
            example = {"pixels": self.transform(data, index, flip)}
        if self.embed_files is not None:
            example["embeds"] = load_file(self.embed_files[index])["embeds"]
        else:
            example["input_ids"] = self.input_ids[index]
        return example
