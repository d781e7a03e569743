"""DreamBooth's data (Ruiz et al. 2023): a subject's images with a rare-token prompt, and class images
for the prior-preservation loss.

- Instance rows: every image of ``instance_data_dir``, captioned ``instance_prompt`` ("a photo of sks
  dog"). Class rows: every image of ``class_data_dir``, captioned ``class_prompt`` ("a photo of a dog").
  ``dreambooth_rows`` gives both in one table, instance rows first, with an ``is_prior`` flag.
- ``StepSampler`` with ``class_rows`` (sdlite/data/samplers.py): each micro-batch of B instance items
  is followed by B class items, so every process's batch holds both halves, and the batch's ``is_prior``
  mask marks the class half (training/sampling.py). With buckets, the class items of a step come from
  the class images of the step's bucket.
- ``prior_preservation_loss``: Ruiz et al. eq. 2, the instance examples' mean loss plus
  prior_loss_weight times the class examples' mean loss.
- ``class_images_needed`` and ``generate_class_images``: top the class folder up to
  ``num_class_images`` with images of the base model (a callable here, so it needs no model to test),
  each written with its caption file beside it. With aspect buckets, ``class_image_sizes`` gives each
  new image a bucket's size, so that the class images' buckets follow the instance images' (in
  proportion, each instance bucket at least one while there are enough): every step draws its class
  half from its own bucket, and the prior then covers the shapes the subject is taught in.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from PIL import Image

from sdlite.data.buckets import (
    Size,
    assign_bucket,
)
from sdlite.data.captions import IMAGE_EXTENSIONS
from sdlite.data.dataset import PROBLEM, WHERE, DataError
from sdlite.data.files import listed_file_problem, shown


def image_files(folder: str | Path) -> list[Path]:
    """The images of a folder and its subfolders, in name order (hidden ones left out)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )  # fmt: skip


def dreambooth_rows(
    instance_data_dir: str | Path,
    instance_prompt: str,
    class_data_dir: str | Path | None = None,
    class_prompt: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    allow_outside: bool = False,
) -> datasets.Dataset:
    """Instance rows then class rows, shaped as ``load_rows``' (images undecoded, by path) with a
    boolean ``is_prior`` column (True: a class row). A file that may not be read (a name that is not
    UTF-8, a link out of its folder unless ``allow_outside``) is a marked row, as in ``caption_rows``."""
    instances = image_files(instance_data_dir) if Path(instance_data_dir).is_dir() else []
    if not instances:
        raise DataError(f"instance_data_dir {str(instance_data_dir)!r} holds no images (files ending "
                        f"{', '.join(IMAGE_EXTENSIONS)}): put the subject's photos there")  # fmt: skip
    if not instance_prompt.strip():
        raise DataError("instance_prompt is empty: give the subject's prompt, e.g. 'a photo of sks dog'")
    classes = []
    if class_data_dir is not None:
        if not (class_prompt or "").strip():
            raise DataError(
                "class_data_dir is set without class_prompt: give the class, e.g. 'a photo of a dog'"
            )
        classes = image_files(class_data_dir) if Path(class_data_dir).is_dir() else []
        if not classes:
            raise DataError(f"class_data_dir {str(class_data_dir)!r} holds no images: generate them first "
                            "(num_class_images) or leave prior preservation off")  # fmt: skip
    # A file that may not be read (a name that is not UTF-8, a link out of its folder) stays a row marked
    # as load_rows marks a bad metadata line: clean_rows skips and lists it, or stops the run.
    why = [listed_file_problem(p, Path(instance_data_dir), allow_outside) for p in instances]
    why += [listed_file_problem(p, Path(class_data_dir), allow_outside) for p in classes]
    paths = instances + classes
    text = datasets.Value("string")
    features = datasets.Features(
        {image_column: datasets.Image(decode=False), caption_column: text, "is_prior": datasets.Value("bool"),
         PROBLEM: text, WHERE: text}
    )  # fmt: skip
    return datasets.Dataset.from_dict(
        {
            image_column: [None if w else {"bytes": None, "path": str(p)} for p, w in zip(paths, why)],
            caption_column: [instance_prompt] * len(instances) + [class_prompt] * len(classes),
            "is_prior": [False] * len(instances) + [True] * len(classes),
            PROBLEM: why,
            WHERE: [shown(p) if w else None for p, w in zip(paths, why)],
        },
        features=features,
    )


def prior_preservation_loss(
    losses: torch.Tensor, is_prior: torch.Tensor, prior_loss_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, instance loss, prior loss) from per-example losses (B,) and flags (B,): the mean over the
    instance examples + prior_loss_weight * the mean over the class examples (a half with no example
    adds nothing)."""
    is_prior = is_prior.to(torch.bool)
    # Which halves exist, asked of the flags where they are (on the CPU: no wait for the device).
    has_instance, has_prior = bool((~is_prior).any()), bool(is_prior.any())
    is_prior = is_prior.to(losses.device)
    zero = losses.new_zeros(())
    instance = losses[~is_prior].mean() if has_instance else zero
    prior = losses[is_prior].mean() if has_prior else zero
    return instance + prior_loss_weight * prior, instance, prior


def class_images_needed(class_data_dir: str | Path, num_class_images: int) -> int:
    """How many class images must still be generated: num_class_images less those present."""
    present = len(image_files(class_data_dir)) if Path(class_data_dir).is_dir() else 0
    return max(0, num_class_images - present)


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights``: one to each positive weight first (the largest first
    while total lasts), the rest by largest remainders (ties to the earlier). Integers, so exact."""
    shares = [0] * len(weights)
    for i in sorted((i for i, w in enumerate(weights) if w > 0), key=lambda i: -weights[i])[:total]:
        shares[i] = 1
    rest, whole = total - sum(shares), sum(weights)
    if rest > 0 and whole > 0:
        floors = [rest * w // whole for w in weights]
        by_remainder = sorted(range(len(weights)), key=lambda i: (-(rest * weights[i] % whole), i))
        for i in by_remainder[: rest - sum(floors)]:
            floors[i] += 1
        shares = [a + b for a, b in zip(shares, floors)]
    return shares


def _image_sizes(folder: str | Path) -> list[Size]:
    """(w, h) of the images of a folder, read from their headers; one that cannot be read is left out
    (clean_rows lists it when training reads the folder)."""
    sizes = []
    for path in image_files(folder) if Path(folder).is_dir() else []:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except Exception:  # PIL raises OSError, SyntaxError, ValueError ... on files that are not images
            continue
    return sizes


def class_image_sizes(
    instance_data_dir: str | Path, class_data_dir: str | Path, buckets: Sequence[Size], num_class_images: int
) -> list[Size]:
    """The size of each class image still to generate (class_images_needed of them), in the order they
    are made, so that the class folder's aspect buckets follow the instance images'.

    The target of bucket b is num_class_images apportioned by the instance images per bucket; a bucket
    lacks its target less the class images already in it. If those lacks exceed the images still to
    make (the folder holds images of other shapes), the images are apportioned by the lacks; if they
    fall short, the rest by the instance images. Sizes go in bucket order, so a run stopped half-way
    and started again plans what is left of the same list (and generate_class_images names and seeds
    the images alike)."""
    missing = class_images_needed(class_data_dir, num_class_images)
    instances = Counter(assign_bucket(size, buckets) for size in _image_sizes(instance_data_dir))
    present = Counter(assign_bucket(size, buckets) for size in _image_sizes(class_data_dir))
    ids = sorted(instances)
    weights = [instances[b] for b in ids]
    lacks = [max(0, t - present[b]) for t, b in zip(apportion(num_class_images, weights), ids)]
    if sum(lacks) > missing:
        plan = apportion(missing, lacks)
    else:
        plan = [a + b for a, b in zip(lacks, apportion(missing - sum(lacks), weights))]
    return [buckets[b] for b, count in zip(ids, plan) for _ in range(count)]


def generate_class_images(
    class_data_dir: str | Path,
    class_prompt: str,
    num_class_images: int,
    make_images: Callable[[list[str], list[int], Size | None], list],
    batch_size: int = 4,
    seed: int = 0,
    sizes: Sequence[Size] | None = None,
) -> list[Path]:
    """Top ``class_data_dir`` up to ``num_class_images``; returns the files written.

    ``make_images(prompts, seeds, size)`` returns one PIL image per prompt, image i made from seeds[i]
    (so a run stopped half-way and started again makes the same images), all of ``size`` (w, h), or of
    the model's size when it is None. ``sizes``: each missing image's size, in order (class_image_sizes;
    None: all of the model's size); a batch holds images of one size. Each image is written as
    ``class_NNNNN.png`` (the first free numbers), atomically (an interrupted run leaves no half-written
    image), then ``class_NNNNN.txt`` beside it holding its prompt.
    """
    folder = Path(class_data_dir)
    missing = class_images_needed(folder, num_class_images)
    sizes = [None] * missing if sizes is None else list(sizes)
    if len(sizes) != missing:
        raise ValueError(f"{len(sizes)} sizes for the {missing} class images to make")
    folder.mkdir(parents=True, exist_ok=True)
    taken = {p.stem for p in image_files(folder)}  # a caption left by an interrupted run is rewritten
    names = (f"class_{i:05d}" for i in range(10**9) if f"class_{i:05d}" not in taken)
    plan = [next(names) for _ in range(missing)]
    batches = []  # runs of one size, at most batch_size long, in plan order
    for name, size in zip(plan, sizes):
        if batches and batches[-1][0] == size and len(batches[-1][1]) < batch_size:
            batches[-1][1].append(name)
        else:
            batches.append((size, [name]))
    written = []
    for size, chunk in batches:
        seeds = [int(name.split("_")[1]) + seed * 1_000_003 for name in chunk]
        images = make_images([class_prompt] * len(chunk), seeds, size)
        if len(images) != len(chunk):
            raise ValueError(f"make_images returned {len(images)} images for {len(chunk)} prompts")
        for name, image in zip(chunk, images):
            tmp = folder / f".{name}.png.tmp"  # hidden: never read as an image
            image.save(tmp, format="PNG")
            os.replace(tmp, folder / f"{name}.png")
            (folder / f"{name}.txt").write_text(class_prompt + "\n")
            written.append(folder / f"{name}.png")
    return written
