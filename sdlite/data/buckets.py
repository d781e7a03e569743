"""Aspect-ratio buckets (NovelAI's, as kohya's sd-scripts and SDXL's training use them).

Instead of cropping every image to a square, images are grouped by aspect ratio into bucket sizes of
about the same pixel count as resolution² (so a step costs about the same whatever its bucket):

- ``make_buckets``: for each width w from min_side to max_side in steps of ``step`` (kohya's
  bucket_reso_steps; by default ``bucket_multiple``, the finest the model takes), the tallest h, a
  multiple too, with w * h <= resolution², and each size's transpose;
- ``assign_bucket``: an image goes to the bucket of the nearest aspect ratio (in log scale, so 2:1
  and 1:2 are equally far from 1:1); with ``no_upscale`` (kohya's bucket_no_upscale) it instead gets
  a bucket of its own: its size, scaled down to resolution² pixels if larger, each side rounded down
  to the step, so that no image is enlarged (``bucket_rows`` gathers the set from the images);
- ``BucketTransform``: scale the image so that it covers its bucket, then crop the small excess of one
  side (centred, or a random offset from (seed, index), the same every epoch so that latents cache).
  It stands in for ``ImageTransform`` (same ``crop_box`` and call), and gives SDXL's size and crop
  conditioning (the image's real size and the crop's top-left);
- ``StepSampler`` with ``buckets`` (sdlite/data/samplers.py): every optimizer step's global batch comes
  from one bucket, so every process and every accumulation micro-step of a step holds images of one
  size, with the same exact resume and DDP slicing as without.

A bucket with fewer images than the global batch G (even one image) is not merged into another bucket,
which would crop its images to another aspect: its step is filled by repeating its images (each at
least once per epoch). Every bucket's last short run is filled the same way, so no image is ever
dropped from an epoch; the price is that an image of a tiny bucket is seen up to G times per epoch.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sdlite.data.decoding import check_aspect, decode_image, pixel_limit
from sdlite.latents import vae_factor

Size = tuple[int, int]  # (width, height) in pixels, as PIL


def bucket_multiple(vae_config) -> int:
    """What bucket sides must be multiples of, and the default step: the VAE factor (whole latent
    pixels). The U-Net asks for nothing more: diffusers' UNet2DConditionModel pads a side that one of
    its downsamplers halves to an odd size and hands each upsampler the size of its skip, so a latent
    of any side runs and comes back at that side (tests/test_buckets.py runs the tiny presets' U-Nets
    at odd sides)."""
    return vae_factor(vae_config)


def bucket_step(vae_config, step: int | None = None, resolution: int | None = None) -> int:
    """The step of bucket sides: ``step`` (the bucket_step setting), refused unless a multiple of
    ``bucket_multiple``. None: ``default_bucket_step``."""
    multiple = bucket_multiple(vae_config)
    if step is None:
        return default_bucket_step(multiple, resolution)
    if step < 1 or step % multiple:
        below = max(multiple, step // multiple * multiple)
        raise ValueError(
            f"bucket_step {step} is not a multiple of {multiple}, the VAE factor (a bucket side must be "
            f"whole latent pixels): use {below} or {below + multiple}"
        )
    return step


def default_bucket_step(factor: int, resolution: int | None) -> int:
    """Eight latent pixels (64 px on SD and SDXL, kohya's default: latents that halve cleanly through the
    U-Net's downsampling), but no coarser than an eighth of the resolution, so that a small model's
    images get buckets of their own shape too (at 32 px, a step of 32 would leave one square bucket)."""
    step = factor * 8
    while resolution is not None and step > factor and step > resolution // 8:
        step //= 2
    return step


def make_buckets(
    resolution: int, multiple: int, min_side: int | None = None, max_side: int | None = None
) -> list[Size]:
    """Bucket sizes (w, h) with w, h multiples of ``multiple`` (the step) in [min_side, max_side], h the
    tallest with w * h <= resolution² (so w * h > resolution² - multiple * max(w, h)). Defaults:
    resolution / 2 to resolution * 2, as kohya's min/max_bucket_reso at its defaults; unlike kohya's, a
    width whose tallest h would pass max_side is left out rather than kept with fewer pixels."""
    if resolution % multiple:
        below, above = resolution // multiple * multiple, (resolution // multiple + 1) * multiple
        choices = f"{below} or {above}" if below else f"{above}"
        raise ValueError(
            f"resolution {resolution} is not a multiple of the bucket step {multiple}, which aspect "
            f"buckets need: choose {choices}, or a bucket_step that divides it"
        )
    lo = max(multiple, (min_side or resolution // 2) // multiple * multiple)
    hi = (max_side or resolution * 2) // multiple * multiple
    if not lo <= resolution <= hi:
        raise ValueError(f"bucket sides {lo}..{hi} must hold the resolution {resolution}")
    area, sizes = resolution * resolution, set()
    for w in range(lo, hi + 1, multiple):
        h = area // w // multiple * multiple
        if lo <= h <= hi:  # a narrower w would need h past max_side: that size would lose pixels, left out
            sizes.update({(w, h), (h, w)})
    return sorted_buckets(sizes)


def assign_bucket(size: Size, buckets: Sequence[Size]) -> int:
    """The index of the bucket whose aspect ratio is nearest the image's (log scale; ties: larger area)."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: (abs(math.log(buckets[b][0] / buckets[b][1]) - aspect),
                                                   -buckets[b][0] * buckets[b][1]))  # fmt: skip


def own_bucket(size: Size, resolution: int, step: int) -> Size:
    """An image's bucket without upscaling (kohya's bucket_no_upscale): its size, scaled down to
    resolution² pixels if it has more, each side rounded down to the step (at least one step: a side
    shorter than that is the one thing enlarged, as a latent needs a whole pixel)."""
    scale = min(1.0, resolution / math.sqrt(size[0] * size[1]))
    return tuple(max(step, int(side * scale) // step * step) for side in size)


def sorted_buckets(sizes) -> list[Size]:
    """Bucket sizes in the order make_buckets gives: by aspect ratio, then size."""
    return sorted(set(sizes), key=lambda s: (s[0] / s[1], s))


def covering_size(size: Size, bucket: Size) -> Size:
    """The image's size scaled (aspect kept) to cover the bucket: one side equals the bucket's, the
    other is at least the bucket's."""
    scale = max(bucket[0] / size[0], bucket[1] / size[1])
    return max(bucket[0], round(size[0] * scale)), max(bucket[1], round(size[1] * scale))


@dataclass(frozen=True)
class BucketTransform:
    """Encoded image -> (3, h, w) float tensor in [-1, 1] of its bucket's size (w, h): resize to cover
    the bucket, crop the excess, optional flip. With ``no_upscale`` an image's bucket is ``own_bucket``
    (of ``step``), and ``buckets`` must hold those of the images (``bucket_rows`` makes it so).

    A cache key holds ``resolution`` and the crop box, and that is enough whatever the bucket set, step
    or no_upscale: the box's size is the bucket, the resize is covering_size of the image's size and the
    bucket, so an image whose bucket changes gets a new key and one whose bucket stays shares its
    entry, its pixels being the same."""

    resolution: int
    buckets: tuple[Size, ...]
    random_crop: bool = False
    seed: int = 0
    no_upscale: bool = False
    step: int = 1  # the sides' step (used with no_upscale; the buckets hold it otherwise)

    def bucket(self, size: Size) -> Size:
        if self.no_upscale:
            return own_bucket(size, self.resolution, self.step)
        return self.buckets[assign_bucket(size, self.buckets)]

    def resized_size(self, size: Size) -> Size:
        return covering_size(size, self.bucket(size))

    def crop_box(self, size: Size, index: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) in the resized image; a random crop is a function of (seed, index)."""
        (w, h), (bw, bh) = self.resized_size(size), self.bucket(size)
        if self.random_crop:
            rng = np.random.default_rng([self.seed, index])
            left, top = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
        else:
            left, top = (w - bw) // 2, (h - bh) // 2
        return left, top, left + bw, top + bh

    def fit(self, image: Image.Image, index: int) -> tuple[Image.Image, Size, tuple[int, int]]:
        """(image in its bucket, its original (w, h), the crop's top-left (top, left))."""
        size, box = image.size, self.crop_box(image.size, index)
        resized = self.resized_size(size)
        check_aspect(size)  # before the resize: a thin strip would be scaled to a huge one
        if resized != size:
            image = image.resize(resized, Image.BICUBIC)
        if box != (0, 0, *resized):
            image = image.crop(box)
        return image, size, (box[1], box[0])

    def __call__(self, data: bytes, index: int, flip: bool = False) -> torch.Tensor:
        image, _, _ = self.fit(decode_image(data, pixel_limit(self.resolution)), index)  # clean_rows' limit
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        return pixels.flip(-1) if flip else pixels  # (3, h, w)


def bucket_transform(resolution: int, vae_config, step: int | None = None, min_side: int | None = None,
                     max_side: int | None = None, no_upscale: bool = False, random_crop: bool = False,
                     seed: int = 0) -> BucketTransform:  # fmt: skip
    """The BucketTransform of these settings (bucket_step, bucket_min_side, bucket_max_side,
    bucket_no_upscale) for a model of this VAE: training and DreamBooth's class images use this one."""
    step = bucket_step(vae_config, step, resolution)
    sizes = make_buckets(resolution, step, min_side, max_side)
    return BucketTransform(resolution, tuple(sizes), random_crop, seed, no_upscale, step)


def bucket_counts(bucket_of_rows: Sequence[int], buckets: Sequence[Size]) -> dict[str, int]:
    """``"WxH"`` -> number of images, for the buckets that hold any (in bucket order)."""
    counts = Counter(bucket_of_rows)
    return {f"{w}x{h}": counts[b] for b, (w, h) in enumerate(buckets) if counts[b]}


def write_buckets_json(path: str | Path, counts: dict[str, int]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(counts, indent=1) + "\n")


def bucket_summary(counts: dict[str, int], global_batch: int) -> str:
    """One line for the start-up log."""
    listed = ", ".join(f"{name} {n}" for name, n in counts.items())
    small = sum(1 for n in counts.values() if n < global_batch)
    note = (f" ({small} with fewer images than the global batch {global_batch}: repeated within their step)"
            if small else "")  # fmt: skip
    return f"aspect buckets: {sum(counts.values())} images in {len(counts)} buckets: {listed}{note}"


class _RowsOf:
    """A transform seen through a subset of rows: local index i is global row ``rows[i]`` (crop seeds)."""

    def __init__(self, transform: BucketTransform, rows: Sequence[int]):
        self.transform, self.rows, self.resolution = transform, rows, transform.resolution

    def crop_box(self, size: Size, index: int) -> tuple[int, int, int, int]:
        return self.transform.crop_box(size, self.rows[index])

    def __call__(self, data: bytes, index: int, flip: bool = False) -> torch.Tensor:
        return self.transform(data, self.rows[index], flip)


def cache_bucket_latents(cache, rows, image_column: str, transform: BucketTransform, bucket_of_rows,
                         vae, flips=(False,), batch_size: int = 32, rank: int = 0, world_size: int = 1,
                         progress=None) -> tuple[list[list[str | None]], int]:  # fmt: skip
    """``sdlite.data.cache.cache_latents`` one bucket at a time (its VAE batches must be of one size);
    the same result: each row's files ``[unflipped, flipped]`` and the number of entries computed."""
    from sdlite.data.cache import cache_latents

    files: list[list[str | None]] = [[None, None] for _ in range(len(rows))]
    computed = 0
    for bucket in sorted(set(bucket_of_rows)):
        members = [r for r, b in enumerate(bucket_of_rows) if b == bucket]
        found, missing = cache_latents(cache, rows.select(members), image_column, _RowsOf(transform, members),
                                       vae, flips, batch_size, rank, world_size, progress)  # fmt: skip
        for r, entry in zip(members, found):
            files[r] = entry
        computed += missing
    return files, computed


def image_sizes(rows, image_column: str) -> list[Size]:
    """Every row's image (width, height), from its header (nothing decoded): for ``image_buckets`` and
    SDXL's size/crop time ids."""
    from sdlite.data.dataset import image_bytes
    from sdlite.data.decoding import image_size

    entries = (e for chunk in rows.select_columns([image_column]).iter(256) for e in chunk[image_column])
    return [image_size(image_bytes(e)) for e in entries]


def image_buckets(rows, image_column: str, transform: BucketTransform) -> list[int]:
    """The bucket of every row (an index into ``transform.buckets``; with no_upscale, see bucket_rows)."""
    transform_of_rows, of_rows = bucket_rows(image_sizes(rows, image_column), transform)
    if transform_of_rows != transform:
        raise ValueError("a no_upscale transform's buckets come from its images: use bucket_rows")
    return of_rows


def bucket_rows(sizes: Sequence[Size], transform: BucketTransform) -> tuple[BucketTransform, list[int]]:
    """The transform for images of these sizes and each one's bucket (an index into its buckets): with
    no_upscale, its buckets are the images' own, as kohya's bucket_no_upscale makes its set from the
    data; else the transform as it is."""
    if not transform.no_upscale:
        return transform, [assign_bucket(size, transform.buckets) for size in sizes]
    own = [transform.bucket(size) for size in sizes]
    buckets = sorted_buckets(own)
    place = {bucket: b for b, bucket in enumerate(buckets)}
    return replace(transform, buckets=tuple(buckets)), [place[bucket] for bucket in own]


def one_bucket_warning(sizes: Sequence[Size], transform: BucketTransform, multiple: int) -> str | None:
    """A warning when every image fell into one bucket but their shapes differ from it (so every image
    is cropped to one aspect, as without buckets), naming why and what to change; else None."""
    buckets = {transform.bucket(size) for size in sizes}
    if len(buckets) != 1:
        return None
    (w, h), aspects = buckets.pop(), [a / b for a, b in sizes]
    if all(abs(math.log(a * h / w)) < 0.01 for a in aspects):
        return None  # the images have the bucket's shape: nothing is lost
    step, resolution = transform.step, transform.resolution
    finer = f"a smaller bucket_step (this model takes multiples of {multiple}), " if step > multiple else ""
    own = "" if transform.no_upscale else ", or bucket_no_upscale (a bucket of each image's own size)"
    return (
        f"warning: aspect buckets: all {len(sizes)} images fell into one bucket, {w}x{h}, so their aspect "
        f"ratios {min(aspects):.2f}..{max(aspects):.2f} are all cropped to {w / h:.2f}: at resolution "
        f"{resolution} with bucket_step {step} no bucket of about {resolution}x{resolution} pixels is "
        f"nearer their shape; for buckets of their shape use {finer}a larger resolution{own}"
    )
