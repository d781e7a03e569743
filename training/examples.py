"""The training data of a U-Net run, from its data config to what the step reads: ``training_data``
returns the (cached) training examples and their sampler, the empty caption, the latent shape and the
held-out batch (``TrainingData``), built in the model family's terms (training/family.py).

Photo sets as sd-scripts users keep them go through the same ``training_data``: ``rows_for`` reads a
caption folder (sdlite/data/captions.py) or DreamBooth's instance and class folders
(sdlite/data/dreambooth.py), and the ``DataLayout`` it fills tells ``sampler_for`` (training/sampling.py)
how to draw them: aspect buckets, repeats, captions drawn per step, subject and class halves. DreamBooth's
class images are generated first, with the base model (``top_up_class_images``).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from sdlite.data.buckets import BucketTransform, bucket_transform, cache_bucket_latents
from sdlite.data.cache import DecodedImages, TensorCache, cache_latents
from sdlite.data.captions import (
    CaptionOptions,
    append_problems,
    caption_rows,
    draw_caption,
    is_caption_folder,
)
from sdlite.data.cleaning import clean_rows
from sdlite.data.dataset import ImageTransform, caption_text, load_rows
from sdlite.data.dreambooth import (
    class_image_sizes,
    class_images_needed,
    dreambooth_rows,
    generate_class_images,
)
from sdlite.data.samplers import seeded_generator
from sdlite.latents import vae_factor
from training.sampling import DataLayout, sampler_for

if TYPE_CHECKING:
    from training.config.unet import (
        CaptionSection,
        DataSection,
        DreamBoothSection,
        OptimizerSection,
        TrainConfig,
        ValidationSection,
    )
    from training.family import StableDiffusion


@dataclass
class TrainingData:
    """What a U-Net run trains on, made from its data config by ``training_data``."""

    examples: torch.utils.data.Dataset  # what the loader reads, item by item (the sampler's items)
    sampler: object  # the batch sampler (training/sampling.py), or a stream that is its own
    empty: object  # c of the empty caption (caption dropout), or its token ids: the family's
    latent_shape: tuple[int, int, int]  # (C, h, w) of the square images' latents
    held_out: dict | None  # the held-out batch with its fixed draws; None without val_data_dir
    layout: DataLayout

    def loader(self, start_step: int, workers: int, pin_memory: bool, seed: int):
        """The batches of optimizer steps ``start_step`` on."""
        if self.sampler is self.examples:  # a stream (sdlite.data.streaming): a resume skips what was read
            return self.examples.loader(start_step, workers, pin_memory)
        self.sampler.start_at(start_step)
        generator = torch.Generator().manual_seed(seed)  # the global RNG untouched: exact resume
        return torch.utils.data.DataLoader(self.examples, batch_sampler=self.sampler, num_workers=workers,
                                           prefetch_factor=4 if workers else None, pin_memory=pin_memory,
                                           generator=generator)  # fmt: skip

    def step_latent_shape(self, step: int) -> tuple[int, int, int]:
        """(C, h, w) of the step's latents: its bucket's with aspect buckets (every process draws the same
        bucket at a step), else the square one."""
        if self.layout.bucket_of_rows is None:
            return self.latent_shape
        return self.layout.latent_shape(self.sampler.step_bucket(step))


def training_data(cfg: TrainConfig, acc, family: StableDiffusion) -> TrainingData:
    """The training examples (cached as configured) and their sampler, the empty caption, the latent
    shape and the held-out batch: everything the step reads of the data, in the family's terms. The one
    function here that takes the whole config: it hands each part the sections it reads. DreamBooth's
    missing class images are generated first, with the base model (call it before adapters attach)."""
    data, captions, opt, validation = cfg.data, cfg.captions, cfg.optimizer, cfg.validation
    vae = family.parts.vae.config
    resolution = data.resolution or vae.sample_size
    factor = vae_factor(vae)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}")
    latent_shape = (vae.latent_channels, resolution // factor, resolution // factor)
    class_buckets = None  # the sizes of the class images generated for aspect buckets
    if captions.aspect_buckets:
        sides = (captions.bucket_min_side, captions.bucket_max_side)
        class_buckets = bucket_transform(resolution, vae, captions.bucket_step, *sides).buckets
    top_up_class_images(cfg.dreambooth, validation, opt.seed, class_buckets, acc, family)
    transform = ImageTransform(resolution, data.random_crop, opt.seed, max_pixels=data.max_image_pixels)
    options = caption_options(captions)
    layout = DataLayout(transform, vae.latent_channels, factor, options)
    if captions.aspect_buckets:  # the training rows only: the held-out batch stays square (one tensor)
        layout.transform = bucket_transform(resolution, vae, captions.bucket_step, captions.bucket_min_side,
                                            captions.bucket_max_side, captions.bucket_no_upscale,
                                            data.random_crop, opt.seed)  # fmt: skip
    # A stream is encoded as it comes (no cache): its batches carry token ids, so the empty caption must too;
    # a caption drawn anew at every draw (shuffle_caption, tag dropout) has no one embedding to cache.
    embeds_cached = (
        data.cache_text and not cfg.text_encoder_trains and not data.streaming and not options.per_draw
    )
    reader = ExampleReader(data, cfg.dreambooth, opt, cfg.run.output_dir, acc, family, resolution, transform,
                           layout, embeds_cached)  # fmt: skip
    if data.streaming:  # its own sampler; its DataLoader comes from examples.loader(start_step, ...)
        examples = sampler = streamed_examples(data, opt, acc, transform, family.parts.tokenizer)
    else:
        source = training_source(data, cfg.dreambooth)
        examples = reader.examples(source, (False, True) if data.random_flip else (False,))
    empty = family.empty_condition(embeds_cached, acc.device)  # c of the empty caption, or its ids
    held_out = None
    if validation.val_data_dir and validation.val_count > 0:
        held_out = reader.held_out_batch(validation, latent_shape)
    if not data.streaming:
        sampler = sampler_for(layout, opt, data.random_flip, acc)
        layout.report_buckets(sampler.global_batch, cfg.run.output_dir, acc)
        examples = layout.as_drawn(examples, family.parts.tokenizer, opt.seed)
    return TrainingData(examples, sampler, empty, latent_shape, held_out, layout)


@dataclass
class ExampleReader:
    """Reads a data source into examples the family's way: its rows listed and checked, its captions
    tokenized, its latents and text embeddings cached as configured."""

    data: DataSection
    dreambooth: DreamBoothSection  # its instance folder's rows add the class folder's
    opt: OptimizerSection  # the seed, and the batch size the VAE encodes in
    output_dir: str  # where the bad-files reports go
    acc: object  # accelerate.Accelerator
    family: StableDiffusion
    resolution: int
    transform: ImageTransform  # the square one; the training rows' is the layout's
    layout: DataLayout
    embeds_cached: bool

    def examples(self, source: str, flips: tuple[bool, ...], limit: int | None = None):
        """The examples of a source: the training rows (``limit`` None; the layout reads them) or the
        first ``limit`` held-out rows (square, their captions never drawn)."""
        data, opt, acc, family, layout = self.data, self.opt, self.acc, self.family, self.layout
        trained = not limit
        rows, written, report = self.checked_rows(source, limit)
        options = layout.options if trained else held_out_options(layout.options)
        ids = family.token_ids(fixed_captions(written, options, opt.seed))  # one (N, L) tensor per tokenizer
        if trained:
            layout.read(rows, written, data.image_column)
        transform = layout.transform if trained else self.transform
        # Split misses among one machine's processes: a cache folder local to each machine fills too.
        rank, world_size = acc.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        cache = TensorCache(Path(data.cache_dir).expanduser())
        latent_files = embed_files = None
        if data.cache_latents:
            latent_files = self.cache_latents(cache, rows, source, transform, flips, rank, world_size)
        if self.embeds_cached:
            embed_files, missing = family.cache_text(cache, ids, rank, world_size)
            acc.print(f"{source}: {len(rows)} captions, {missing} text embeddings computed")
        acc.wait_for_everyone()  # every process's share of the cache is written
        return family.examples(rows, data.image_column, transform, ids, latent_files, embed_files,
                               report=report if acc.is_main_process else None, log=acc.print,
                               groups=layout.groups(len(rows)) if trained else None)  # fmt: skip

    def checked_rows(self, source: str, limit: int | None):
        """(rows, their captions as written, the bad-files report): every image checked now (decoded,
        unless an earlier run did), so that a bad one is skipped or stops the run before step 0, never
        in the middle of an epoch."""
        data, acc = self.data, self.acc
        rows, listed = rows_for(data, self.dreambooth, source)
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        report = Path(self.output_dir) / ("bad_files_val.txt" if limit else "bad_files.txt")
        decoded = DecodedImages(Path(data.cache_dir).expanduser()) if data.cache_latents else None
        rows = clean_rows(rows, data.image_column, data.caption_column, self.resolution,
                          self.family.parts.tokenizer, data.bad_data, report if acc.is_main_process else None,
                          acc.print, decoded, max_pixels=data.max_image_pixels)  # fmt: skip
        if acc.is_main_process:  # what caption_rows found odd joins clean_rows' report
            append_problems(report, listed)
        return rows, [caption_text(c) for c in rows[data.caption_column]], report

    def cache_latents(self, cache, rows, source: str, transform, flips, rank: int, world_size: int):
        """Each row's cached latent files, [unflipped, flipped]; with buckets one bucket at a time (a VAE
        batch holds images of one size)."""
        data, acc, vae = self.data, self.acc, self.family.parts.vae
        batch = self.opt.train_batch_size
        with tqdm(desc="encoding latents", unit="image", disable=not acc.is_local_main_process) as bar:
            if isinstance(transform, BucketTransform):
                files, missing = cache_bucket_latents(cache, rows, data.image_column, transform,
                                                      self.layout.bucket_of_rows, vae, flips, batch, rank,
                                                      world_size, bar.update)  # fmt: skip
            else:
                files, missing = cache_latents(cache, rows, data.image_column, transform, vae, flips, batch,
                                               rank, world_size, bar.update)  # fmt: skip
        acc.print(f"{source}: {len(rows)} images x {len(flips)} flips, {missing} latents computed")
        return files

    def held_out_batch(self, validation: ValidationSection, latent_shape: tuple[int, int, int]) -> dict:
        """The held-out rows as one batch on the device, with the validation loss's timesteps and its
        noise, both fixed for the whole run."""
        acc = self.acc
        held_out = self.examples(validation.val_data_dir, (False,), validation.val_count)
        batch = torch.utils.data.default_collate([held_out[(i, False)] for i in range(len(held_out))])
        T, n = self.family.parts.scheduler.config.num_train_timesteps, len(held_out)
        generator = seeded_generator(self.opt.seed, "validation", device=acc.device)
        timesteps = sorted({min(t, T - 1) for t in validation.val_timesteps})
        return {
            "batch": {k: v.to(acc.device) for k, v in batch.items()},
            "timesteps": timesteps,
            "noise": torch.randn((len(timesteps), n, *latent_shape), generator=generator, device=acc.device),
            "latent_noise": torch.randn((n, *latent_shape), generator=generator, device=acc.device),
        }


def streamed_examples(data: DataSection, opt: OptimizerSection, acc, transform: ImageTransform, tokenizer):
    """train_data_dir's shards as a stream (sdlite/data/streaming.py): nothing cached, its own sampler."""
    from sdlite.data.streaming import StreamingExamples, load_stream, parquet_rows

    stream = load_stream(data.train_data_dir, data.image_column, data.caption_column,
                         allow_outside=data.allow_outside_paths)  # fmt: skip
    return StreamingExamples(stream, data.image_column, data.caption_column, transform, tokenizer,
                             opt.train_batch_size, opt.seed, acc.num_processes, acc.process_index,
                             opt.gradient_accumulation_steps, data.random_flip, data.shuffle_buffer,
                             num_items=parquet_rows(data.train_data_dir))  # fmt: skip


# ---- photo sets: caption folders, repeats, caption handling, aspect buckets -----------------------------


def caption_options(captions: CaptionSection) -> CaptionOptions:
    return CaptionOptions(captions.shuffle_caption, captions.keep_tokens, captions.caption_prefix,
                          captions.caption_separator, captions.caption_tag_dropout_rate)  # fmt: skip


def held_out_options(options: CaptionOptions) -> CaptionOptions:
    """The held-out captions: the trigger word, never a shuffle (the validation loss must stay fixed)."""
    return CaptionOptions(caption_prefix=options.caption_prefix, separator=options.separator)


def fixed_captions(captions: list[str], options: CaptionOptions, seed: int) -> list[str]:
    """The captions to tokenize (and cache) once: as drawn when no draw changes them, else as written
    (``DrawnCaptions`` then draws each at every step)."""
    if options.per_draw or options == CaptionOptions(separator=options.separator):
        return captions
    return [draw_caption(c, options, seed, 0, 0) for c in captions]


def rows_for(data: DataSection, db: DreamBoothSection, source: str):
    """The rows of a data source and what was found odd while listing them: DreamBooth's instance
    (and class) images, a caption folder (images with .txt/.caption files beside them, N_name repeat
    folders) through ``caption_rows``, anything else through ``load_rows`` (nothing listed)."""
    if db.instance_data_dir and source == db.instance_data_dir:  # DreamBooth's subject and class images
        rows = dreambooth_rows(db.instance_data_dir, db.instance_prompt, db.class_data_dir,
                               db.class_prompt, data.image_column, data.caption_column,
                               allow_outside=data.allow_outside_paths)  # fmt: skip
        return rows, []
    if is_caption_folder(source):
        return caption_rows(
            source, data.image_column, data.caption_column, allow_outside=data.allow_outside_paths
        )
    rows = load_rows(source, data.image_column, data.caption_column, bad_data=data.bad_data,
                     allow_outside=data.allow_outside_paths)  # fmt: skip
    return rows, []


# ---- DreamBooth ---------------------------------------------------------------------------------------


def training_source(data: DataSection, db: DreamBoothSection) -> str:
    """Where the training rows come from: DreamBooth's instance folder (``rows_for`` adds the class
    folder), else train_data_dir."""
    return db.instance_data_dir or data.train_data_dir


@torch.no_grad()
def top_up_class_images(db: DreamBoothSection, validation: ValidationSection, seed: int, buckets: list | None,
                        acc, family: StableDiffusion) -> None:  # fmt: skip
    """Generate the class images class_data_dir lacks (of num_class_images) with the base model, before
    any adapter is attached, on the main process while the others wait; ``validation`` gives the
    sampling steps and guidance. Image i comes from its own seed
    (sdlite.data.dreambooth.generate_class_images), so a run stopped half-way makes the same images.
    With aspect buckets (``buckets``: their sizes) they are made in the subject photos' bucket sizes, in
    proportion to them (class_image_sizes): each step's class half is drawn from its own bucket."""
    if not db.class_data_dir:
        return
    missing = class_images_needed(db.class_data_dir, db.num_class_images)
    if acc.is_main_process and missing:
        sizes, shapes = None, ""
        if buckets is not None:
            sizes = class_image_sizes(db.instance_data_dir, db.class_data_dir, buckets, db.num_class_images)
            shapes = " in the subject's shapes " + ", ".join(
                f"{w}x{h}: {n}" for (w, h), n in Counter(sizes).items()
            )
        acc.print(f"generating {missing} class images ({db.class_prompt!r}) into {db.class_data_dir}{shapes}")
        pipe = family.pipeline()
        modes = [(m, m.training) for m in (family.parts.unet, family.parts.text_encoder)]
        for module, _ in modes:
            module.eval()

        def make_images(prompts: list[str], seeds: list[int], size) -> list:
            generators = [torch.Generator(acc.device).manual_seed(s) for s in seeds]
            steps, guidance = validation.validation_inference_steps, validation.validation_guidance
            width, height = size or (None, None)  # None: the model's size
            return pipe(prompts, width=width, height=height, num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators, output_type="pil").images  # fmt: skip

        try:
            generate_class_images(db.class_data_dir, db.class_prompt, db.num_class_images, make_images,
                                  db.sample_batch_size, seed, sizes)  # fmt: skip
        finally:
            for module, training in modes:
                module.train(training)
    acc.wait_for_everyone()  # every process reads the finished folder
