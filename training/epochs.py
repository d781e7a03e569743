"""Epochs as optimizer steps, where a folder's listing alone tells the data's size.

diffusers' and kohya's scripts count epochs; sdlite counts optimizer steps. An epoch of ``N`` items
(each image once per repeat: sd-scripts' ``N_name`` folders repeat theirs N times) with ``B`` images
per process, ``P`` processes and ``A`` micro-steps per optimizer step is ``ceil(ceil(N / (B P)) / A)``
optimizer steps. The size is read from a folder's listing or its metadata file's lines, never by
opening an image; data in a file (parquet, CSV, a save_to_disk folder) or streamed has no cheap size,
and neither has DreamBooth with class images (they may not exist yet), so those are refused by the
caller naming --max_steps.

This module imports neither torch nor any model library (sdlite/data/captions.py does).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

# sdlite.data.captions' IMAGE_EXTENSIONS, written out so as not to import torch here
# (tests/test_foreign_flags.py keeps them equal).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_REPEATS = re.compile(r"^(\d+)_(.+)$")  # sd-scripts' N_name folder


def _on(value: Any) -> bool:
    return str(value).strip().lower() in ("true", "1", "yes", "on")


def repeats(relative: Path) -> int:
    """N of the nearest ``N_name`` folder above an image (relative to the data's root); else 1."""
    for part in reversed(relative.parent.parts):
        if match := _REPEATS.match(part):
            return int(match.group(1))
    return 1


def folder_items(folder: str | Path) -> int | None:
    """Items of one epoch of a data folder: its metadata file's rows, else its images (each N times
    under an ``N_name`` folder); None where the listing does not tell (a file, a save_to_disk folder)."""
    folder = Path(str(folder)).expanduser()
    if not folder.is_dir() or (folder / "dataset_info.json").is_file() or (folder / "state.json").is_file():
        return None
    for name, header in (("metadata.jsonl", 0), ("metadata.csv", 1)):
        if (folder / name).is_file():
            with open(folder / name, "rb") as f:
                return sum(1 for line in f if line.strip()) - header
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for file in files:
            if not file.startswith(".") and os.path.splitext(file)[1].lower() in IMAGE_EXTENSIONS:
                count += repeats(Path(root, file).relative_to(folder))
    return count


def steps_for(
    epochs: str, setting: Callable[[str], Any], processes: int = 1, subset_repeats: int = 1
) -> tuple[int | None, str]:
    """(optimizer steps of ``epochs`` epochs, how they were counted) or (None, why they cannot be)."""
    try:
        count = int(epochs)
    except ValueError:
        return None, f"{epochs!r} is not a whole number of epochs"
    if _on(setting("streaming")):
        return None, "streamed data has no size before it is read"
    if setting("instance_data_dir") and setting("class_data_dir"):
        return None, "an epoch with class images depends on images that may not exist yet"
    folder = setting("instance_data_dir") or setting("train_data_dir")
    items = folder_items(folder) if folder else None
    if not items:
        return None, f"the size of {folder!r} is not known before it is read"
    items *= subset_repeats
    try:
        batch = int(setting("train_batch_size")) * processes
        accumulation = int(setting("gradient_accumulation_steps") or 1)
    except (TypeError, ValueError):
        return None, "train_batch_size or gradient_accumulation_steps is not a whole number"
    if batch < 1 or accumulation < 1:
        return None, "train_batch_size and gradient_accumulation_steps must be >= 1"
    per_epoch = math.ceil(math.ceil(items / batch) / accumulation)
    return count * per_epoch, f"{items} images / {batch} a batch / {accumulation} micro-steps"
