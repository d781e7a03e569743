"""DreamBooth's data (Ruiz et al. 2023): a subject's images with a rare-token prompt, and class images
for the prior-preservation loss.

- Instance rows: every image of ``instance_data_dir``, captioned ``instance_prompt`` ("a photo of sks
  dog"). Class rows: every image of ``class_data_dir``, captioned ``class_prompt`` ("a photo of a dog").
  ``dreambooth_rows`` gives both in one table, instance rows first, with an ``is_prior`` flag.
- ``PriorPairSampler`` wraps the sampler of the instance rows (StepSampler or BucketSampler): each
  micro-batch of B instance items is followed by B class items, so every process's batch holds both
  halves and ``flags`` (the last B) marks the class half. With buckets, the class items of a step come
  from the class images of the step's bucket.
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
from sdlite.data.steps import StepBatches, seeded_generator


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


class PriorPairSampler(StepBatches):
    """The instance sampler's micro-batches, each followed by as many class items (see module docstring).

    Class items: a step's G class items (G: the instance sampler's global batch) are a run of the class
    rows (of the step's bucket, with buckets) in an order drawn from (seed, cycle), a cycle being the
    n // G steps that take disjoint runs of n class rows (n < G: each step takes them all, repeated).
    So they are deterministic in (seed, step): resume and DDP slicing stay exact. The flip of a class
    item is drawn from (seed, step) too. ``global_batch`` and ``positions`` count both halves (2G, 2B);
    ``draw_positions`` places a micro-batch's random draws so that every split of a step draws alike.
    """

    def __init__(
        self,
        instance_sampler,
        class_rows: Sequence[int],
        seed: int,
        class_buckets: Sequence[int] | None = None,
    ):
        if not class_rows:
            raise ValueError("prior preservation needs class rows")
        self.inner, self.seed = instance_sampler, seed
        self.batch_size = 2 * instance_sampler.batch_size
        self.global_batch = 2 * instance_sampler.global_batch
        self.num_items = instance_sampler.num_items
        self.max_steps, self.start_step = instance_sampler.max_steps, instance_sampler.start_step
        self.num_processes, self.process_index = (
            instance_sampler.num_processes,
            instance_sampler.process_index,
        )
        self.accumulation_steps = instance_sampler.accumulation_steps
        self.by_bucket = class_buckets is not None
        self.class_of_bucket: dict[int, list[int]] = {}
        for row, bucket in zip(class_rows, class_buckets or [0] * len(class_rows)):
            self.class_of_bucket.setdefault(bucket, []).append(row)
        if class_buckets is not None:
            needed = set(getattr(instance_sampler, "items_of_bucket", {})) - set(self.class_of_bucket)
            if needed:
                raise DataError(
                    f"aspect buckets {sorted(needed)} hold instance images but no class images: "
                    "generate class images in those sizes or turn aspect_buckets off"
                )

    @property
    def flags(self) -> torch.Tensor:
        """(2B,) True at the class items of every micro-batch."""
        b = self.inner.batch_size
        return torch.arange(2 * b) >= b

    def class_items(self, step: int, count: int, arity: int) -> list[tuple]:
        """The ``count`` class items of a step: distinct rows while the bucket has that many."""
        bucket = self.step_bucket(step) if self.by_bucket else 0
        rows = self.class_of_bucket[bucket]
        n = len(rows)
        if n >= count:  # a cycle is n // count steps, each a disjoint run of one order
            cycle, k = divmod(step, n // count)
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle))
            chosen = order[k * count : (k + 1) * count].tolist()
        else:  # fewer class images than a step holds: each step repeats them all
            cycle = step
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle)).tolist()
            chosen = [order[p % n] for p in range(count)]
        if getattr(self.inner, "random_flip", False):
            flips = (
                torch.rand(count, generator=seeded_generator(self.seed, "class-flip", step)) < 0.5
            ).tolist()
        else:
            flips = [False] * count
        # The same shape as the instance items: (row, flip) or (row, flip, cycle, place) with draw_keys.
        return [(rows[c], f, cycle, c)[:arity] for c, f in zip(chosen, flips)]

    def step_items(self, step: int) -> list[tuple]:
        """The global batch (2 G) in position order: each micro-batch's instances, then its class items."""
        instances = self.inner.step_items(step)
        arity = len(instances[0])
        classes = self.class_items(step, len(instances), arity)
        b, out = self.inner.batch_size, []
        for start in range(0, len(instances), b):
            out += instances[start : start + b] + classes[start : start + b]
        return out

    def step_bucket(self, step: int) -> int:
        return self.inner.step_bucket(step) if hasattr(self.inner, "step_bucket") else 0

    def positions(self, micro_step: int) -> slice:
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    def draw_positions(self, micro_step: int) -> torch.Tensor:
        """Where this process's micro-batch takes its random draws in the step's 2G: instance item k of
        the step at k, class item k at G + k. So an item's noise and timestep do not depend on how the
        step is split into processes and micro-steps (``positions`` interleaves the halves by B)."""
        inner = self.inner.positions(micro_step)
        mine = torch.arange(inner.start, inner.stop)
        return torch.cat([mine, self.inner.global_batch + mine])


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
