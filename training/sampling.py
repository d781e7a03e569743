"""How a U-Net run draws its training rows: ``DataLayout`` says what the rows need (one square size or
aspect buckets, repeats, captions drawn per step, DreamBooth's class images) and ``sampler_for`` composes
the one batch sampler that does it from sdlite/data/samplers.py: ``StepSampler`` (plain epochs),
``BucketSampler`` (buckets, repeats and per-draw captions as its options) and ``PriorPairSampler`` (a
class half after each micro-batch). Every one draws a step's global batch from (seed, step) alone, so
a resumed run and any split into processes and micro-steps see the same items.
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
from sdlite.data.dataset import DataError, ImageTransform, TrainingExamples
from sdlite.data.samplers import BucketSampler, PriorPairSampler, StepSampler
from sdlite.tokenizer import token_ids

if TYPE_CHECKING:
    from training.config.unet import TrainConfig


@dataclass
class DataLayout:
    """How the training rows are drawn, beyond StepSampler's plain epochs of square images: their
    transform (``BucketTransform`` with aspect buckets), each row's bucket and repeat count, and the
    captions as written (for per-draw caption handling)."""

    transform: ImageTransform | BucketTransform
    latent_channels: int
    factor: int  # the VAE's spatial factor
    options: CaptionOptions
    bucket_of_rows: list[int] | None = None
    repeats: list[int] | None = None
    captions: list[str] | None = None
    class_rows: list[int] | None = None  # DreamBooth's class images (prior preservation), if any
    bucket_warning: str | None = None  # all images in one bucket of another shape: why, and what to change

    def read(self, rows, captions: list[str], image_column: str) -> None:
        """Take what the sampler needs from the cleaned training rows."""
        self.captions = captions
        if "repeats" in rows.column_names:
            self.repeats = [int(n) for n in rows["repeats"]]
        if "is_prior" in rows.column_names and any(rows["is_prior"]):
            self.class_rows = [r for r, prior in enumerate(rows["is_prior"]) if prior]
            self.repeats = [0 if prior else 1 for prior in rows["is_prior"]]  # a step's own items: instances
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

    @property
    def plain(self) -> bool:
        """Whether StepSampler's epochs do: one square size, each row once, captions fixed."""
        repeated = self.repeats is not None and any(n != 1 for n in self.repeats)
        return (
            self.bucket_of_rows is None and not repeated and not self.options.per_draw and not self.class_rows
        )

    def latent_shape(self, bucket: int) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a bucket's images."""
        w, h = self.transform.buckets[bucket]
        return self.latent_channels, h // self.factor, w // self.factor


def sampler_for(cfg: TrainConfig, acc, examples: TrainingExamples, layout: DataLayout, tokenizer):
    """The batch sampler of the training rows (from step 0; ``start_at`` moves it) and the dataset it
    indexes: StepSampler over the examples, or (buckets, repeats or per-draw captions) a BucketSampler,
    its captions drawn per item by ``DrawnCaptions``; with DreamBooth's class images a PriorPairSampler
    around it, and each item says whether it is a class image (``is_prior``). With buckets the main
    process writes output_dir/buckets.json and logs the counts."""
    data, opt, db, run = cfg.data, cfg.optimizer, cfg.dreambooth, cfg.run
    split = (opt.train_batch_size, opt.seed, opt.max_steps, 0, acc.num_processes, acc.process_index,
             opt.gradient_accumulation_steps)  # fmt: skip
    if layout.plain:
        return StepSampler(len(examples), *split, random_flip=data.random_flip), examples
    sampler = BucketSampler(layout.bucket_of_rows, *split, random_flip=data.random_flip,
                            repeats=layout.repeats, num_rows=len(examples),
                            draw_keys=layout.options.per_draw)  # fmt: skip
    if layout.bucket_of_rows is not None:
        counts = bucket_counts(layout.bucket_of_rows, layout.transform.buckets)
        if acc.is_main_process:
            write_buckets_json(Path(run.output_dir) / "buckets.json", counts)
        acc.print(bucket_summary(counts, sampler.global_batch))
        if layout.bucket_warning:
            acc.print(layout.bucket_warning)
    if layout.class_rows:  # each micro-batch: B instance items, then B class items
        buckets = layout.bucket_of_rows
        class_buckets = None if buckets is None else [buckets[r] for r in layout.class_rows]
        if buckets is not None:  # each step's class half comes from the step's bucket: name what is missing
            bare = sorted({buckets[r] for r in range(len(buckets)) if layout.repeats[r]} - set(class_buckets))
            if bare:
                sizes = ", ".join("{}x{}".format(*layout.transform.buckets[b]) for b in bare)
                raise DataError(
                    f"aspect buckets {sizes} hold subject photos but no class image: add class images of "
                    f"those shapes to {db.class_data_dir} (class images are generated in the subject's "
                    "shapes only while the folder holds fewer than num_class_images), or turn "
                    "aspect_buckets off"
                )
        sampler = PriorPairSampler(sampler, layout.class_rows, opt.seed, class_buckets=class_buckets)
        examples = MarkedPriors(examples, layout.class_rows)
    if layout.options.per_draw:
        tokenize = functools.partial(token_ids, tokenizer)
        examples = DrawnCaptions(examples, layout.captions, tokenize, layout.options, opt.seed)
    return sampler, examples


class MarkedPriors(torch.utils.data.Dataset):
    """The examples, each also saying whether it is one of DreamBooth's class images: ``is_prior``, a
    bool the collated batch carries as a (B,) mask for the prior-preservation loss."""

    def __init__(self, examples, class_rows: list[int]):
        self.examples, self.class_rows = examples, frozenset(class_rows)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item: tuple) -> dict[str, torch.Tensor]:
        return {**self.examples[item], "is_prior": torch.tensor(item[0] in self.class_rows)}
