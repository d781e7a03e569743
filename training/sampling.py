"""How a U-Net run draws its training rows: ``DataLayout`` says what the rows need (one square size or
aspect buckets, repeats, captions drawn per step, DreamBooth's class images) and ``sampler_for`` builds
the one batch sampler that does it, sdlite.data.samplers.StepSampler with those as options. It draws a
step's global batch from (seed, step) alone, so a resumed run and any split into processes and
micro-steps see the same items. ``layout.as_drawn`` adds what the items' draws change to the examples:
a caption drawn per draw, and with class images an ``is_prior`` mask each batch carries.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdlite.data.buckets import (
    BucketTransform,
    bucket_counts,
    bucket_rows,
    bucket_summary,
    image_sizes,
    one_bucket_warning,
    write_buckets_json,
)
from sdlite.data.captions import CaptionOptions, DrawnCaptions
from sdlite.data.dataset import DataError, ImageTransform
from sdlite.data.samplers import MissingClassImages, StepSampler
from sdlite.tokenizer import token_ids

if TYPE_CHECKING:
    from training.config.unet import OptimizerSection


@dataclass
class DataLayout:
    """How the training rows are drawn, beyond plain epochs of square images: their transform
    (``BucketTransform`` with aspect buckets), each row's bucket and repeat count, and the captions as
    written (for per-draw caption handling)."""

    transform: ImageTransform | BucketTransform
    latent_channels: int
    factor: int  # the VAE's spatial factor
    options: CaptionOptions
    num_rows: int = 0
    bucket_of_rows: list[int] | None = None
    repeats: list[int] | None = None  # None: each row once an epoch
    captions: list[str] | None = None
    class_rows: list[int] | None = None  # DreamBooth's class images (prior preservation), if any
    bucket_warning: str | None = None  # all images in one bucket of another shape: why, and what to change

    def read(self, rows, captions: list[str], image_column: str) -> None:
        """Take what the sampler needs from the cleaned training rows."""
        self.num_rows, self.captions = len(rows), captions
        if "repeats" in rows.column_names and any(int(n) != 1 for n in rows["repeats"]):
            self.repeats = [int(n) for n in rows["repeats"]]
        if "is_prior" in rows.column_names and any(rows["is_prior"]):
            self.class_rows = [r for r, prior in enumerate(rows["is_prior"]) if prior]
        if isinstance(self.transform, BucketTransform):
            sizes = image_sizes(rows, image_column)
            self.transform, self.bucket_of_rows = bucket_rows(sizes, self.transform)
            self.bucket_warning = one_bucket_warning(sizes, self.transform, self.factor)

    def groups(self, count: int) -> list[tuple] | None:
        """Which rows may stand in for each other when an image breaks mid-run: those of one bucket
        (a batch stacks one size) and one side of DreamBooth (subject or class)."""
        if self.bucket_of_rows is None and not self.class_rows:
            return None
        prior = set(self.class_rows or ())
        buckets = self.bucket_of_rows or [0] * count
        return [(buckets[r], r in prior) for r in range(count)]

    def latent_shape(self, bucket: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a bucket's images."""
        w, h = self.transform.buckets[bucket]
        return self.latent_channels, h // self.factor, w // self.factor

    def as_drawn(self, examples: torch.utils.data.Dataset, tokenizer, seed: int) -> torch.utils.data.Dataset:
        """The examples as the sampler's items read them: each saying whether it is a class image
        (``is_prior``) with DreamBooth's, its caption drawn by ``DrawnCaptions`` when drawn per draw."""
        if self.class_rows:
            examples = MarkedPriors(examples, self.class_rows)
        if self.options.per_draw:
            tokenize = functools.partial(token_ids, tokenizer)
            examples = DrawnCaptions(examples, self.captions, tokenize, self.options, seed)
        return examples

    def report_buckets(self, global_batch: int, output_dir: str, acc) -> None:
        """With buckets: the main process writes output_dir/buckets.json, and the counts are logged."""
        if self.bucket_of_rows is None:
            return
        counts = bucket_counts(self.bucket_of_rows, self.transform.buckets)
        if acc.is_main_process:
            write_buckets_json(Path(output_dir) / "buckets.json", counts)
        acc.print(bucket_summary(counts, global_batch))
        if self.bucket_warning:
            acc.print(self.bucket_warning)


def sampler_for(layout: DataLayout, opt: OptimizerSection, random_flip: bool, acc) -> StepSampler:
    """The batch sampler of the training rows (from step 0; ``start_at`` moves it), with the layout's
    repeats, buckets, per-draw caption keys and class rows as its options."""
    try:
        return StepSampler(layout.num_rows, opt.train_batch_size, opt.seed, opt.max_steps, 0,
                           acc.num_processes, acc.process_index, opt.gradient_accumulation_steps, random_flip,
                           repeats=layout.repeats, buckets=layout.bucket_of_rows,
                           caption_keys=layout.options.per_draw, class_rows=layout.class_rows)  # fmt: skip
    except MissingClassImages as missing:  # each step's class half comes from the step's bucket
        sizes = ", ".join("{}x{}".format(*layout.transform.buckets[b]) for b in missing.buckets)
        raise DataError(
            f"aspect buckets {sizes} hold subject photos but no class image: add class images of those "
            "shapes to class_data_dir (class images are generated in the subject's shapes only while the "
            "folder holds fewer than num_class_images), or turn aspect_buckets off"
        ) from None


class MarkedPriors(torch.utils.data.Dataset):
    """The examples, each also saying whether it is one of DreamBooth's class images: ``is_prior``, a
    bool the collated batch carries as a (B,) mask for the prior-preservation loss."""

    def __init__(self, examples, class_rows: list[int]):
        self.examples, self.class_rows = examples, frozenset(class_rows)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: tuple) -> dict[str, torch.Tensor]:
        return {**self.examples[item], "is_prior": torch.tensor(item[0] in self.class_rows)}
