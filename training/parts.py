"""The model and the data of a training run: load the parts, put LoRA adapters on them, and build the
(cached) training examples and the held-out batch. ``UNetTrainer`` (train.py) calls these.

Photo sets as sd-scripts users keep them go through the same ``build_examples``: ``rows_for`` reads a
caption folder (sdlite/data/captions.py) or DreamBooth's instance and class folders
(sdlite/data/dreambooth.py), and the ``DataLayout`` it returns tells ``sampler_for`` how to draw them:
aspect buckets (sdlite/data/buckets.py), repeats, captions drawn per step, subject and class halves.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from sdlite.data.buckets import (
    BucketSampler,
    BucketTransform,
    bucket_counts,
    bucket_rows,
    bucket_summary,
    bucket_transform,
    cache_bucket_latents,
    image_sizes,
    one_bucket_warning,
    write_buckets_json,
)
from sdlite.data.cache import (
    DecodedImages,
    TensorCache,
    cache_latents,
    cache_text,
    cache_text_xl,
    text_embeddings,
)
from sdlite.data.captions import (
    CaptionOptions,
    DrawnCaptions,
    append_problems,
    caption_rows,
    draw_caption,
    is_caption_folder,
)
from sdlite.data.cleaning import clean_rows
from sdlite.data.dataset import DataError, ImageTransform, TrainingExamples, caption_text, load_rows
from sdlite.data.dreambooth import (
    PriorPairSampler,
    class_image_sizes,
    class_images_needed,
    dreambooth_rows,
    generate_class_images,
)
from sdlite.ddpm import DDPMScheduler
from sdlite.latents import vae_factor
from sdlite.lora import LoraSettings, add_lora, cast_adapters_to_fp32
from sdlite.models import build_components, check_compatible, load_components
from sdlite.models_xl import build_components_xl, check_compatible_xl, is_xl_folder, load_components_xl
from sdlite.presets import PresetXL, get_preset
from sdlite.tokenizer import token_ids
from training.loop import StepSampler, seeded_generator
from training.sdxl_step import (
    ExamplesXL,
    add_lora_text_encoder_2,
    empty_condition_xl,
    encoders_of,
    is_xl,
    sampling_pipeline,
    time_ids_of,
)

if TYPE_CHECKING:
    from training.configs import TrainConfig


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def lora_settings(cfg: TrainConfig) -> LoraSettings:
    return LoraSettings(
        rank=cfg.lora_rank,
        alpha=cfg.lora_alpha,
        dropout=cfg.lora_dropout,
        unet_targets=tuple(cfg.lora_target_modules),
        text_encoder=cfg.lora_text_encoder,
        text_encoder_targets=tuple(cfg.lora_text_encoder_target_modules),
    )


def attach_lora(cfg: TrainConfig, parts, acc) -> None:
    """Freeze the U-Net and text encoder in the weight dtype (fp16/bf16 under mixed precision, else
    fp32) and put fp32 adapters on them.

    Half-precision base weights halve the frozen model's memory; the adapters stay fp32 because
    Adam's small updates vanish when rounded to fp16/bf16 (and the fp16 grad scaler refuses fp16
    gradients). Autocast runs each layer in low precision; peft casts between the two dtypes.
    The adapters' random A comes from the run's seed, so two runs of one config start alike.
    """
    dtype = weight_dtype(acc.mixed_precision)
    if dtype != torch.float32:
        parts.unet.to(dtype)
        parts.text_encoder.to(dtype)
    settings = lora_settings(cfg)
    with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        add_lora(parts.unet, parts.text_encoder, settings)
        if is_xl(parts):  # SDXL's second encoder: frozen alike, its adapter after the first's
            add_lora_text_encoder_2(parts, settings, dtype)
    for model in (parts.unet, *encoders_of(parts).values()):
        cast_adapters_to_fp32(model)


def load_model(cfg: TrainConfig):
    """A pretrained folder or a preset's random init: sdlite.models' Components, or for an SDXL folder or
    preset sdlite.models_xl's ComponentsXL (two tokenizers and text encoders)."""
    if cfg.pretrained:
        return (load_components_xl if is_xl_folder(cfg.pretrained) else load_components)(cfg.pretrained)
    preset = get_preset(cfg.preset)
    if not isinstance(preset, PresetXL):
        return build_components(cfg.shaped_preset(preset), seed=cfg.seed)
    parts = build_components_xl(cfg.preset, seed=cfg.seed)
    # Trained from nothing with dropped captions as the empty prompt's embeddings (sdxl_step.py), its
    # pipeline's unconditional half must be those too, not SDXL base's zeros.
    parts.force_zeros_for_empty_prompt = False
    return parts


def load_parts(cfg: TrainConfig, device: torch.device):
    """The model: a preset's random init or a pretrained folder (SD or SDXL), a separately trained VAE
    (with its own scaling factor), the scheduler options; the VAE (and the text encoders, unless
    trained) frozen. All on ``device``."""
    parts = load_model(cfg)
    if cfg.vae_path:
        path = Path(cfg.vae_path)
        path = path / "vae" if (path / "vae" / "config.json").is_file() else path
        parts.vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
        (check_compatible_xl if is_xl(parts) else check_compatible)(parts)
    overrides = {"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}
    if cfg.rescale_betas_zero_snr:  # sampling must then start at t = T-1: trailing spacing (Lin et al.)
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if overrides:
        parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, **overrides)
    parts.vae.requires_grad_(False).eval()
    for encoder in encoders_of(parts).values():
        encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    for module in (parts.vae, *encoders_of(parts).values(), parts.unet):
        module.to(
            device
        )  # frozen parts stay float32: autocast runs them in low precision, and they save intact
    return parts


def build_examples(cfg: TrainConfig, acc, parts):
    """The training examples, cached as configured, the empty caption, the latent shape, the
    held-out batch with its fixed draws (None without val_data_dir) and the rows' ``DataLayout``."""
    vae = parts.vae.config
    resolution = cfg.resolution or vae.sample_size
    factor = vae_factor(vae)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not a multiple of the VAE's factor {factor}")
    latent_shape = (vae.latent_channels, resolution // factor, resolution // factor)
    transform = ImageTransform(resolution, cfg.random_crop, cfg.seed, max_pixels=cfg.max_image_pixels)
    cache = TensorCache(Path(cfg.cache_dir).expanduser())
    options = caption_options(cfg)
    # A stream is encoded as it comes (no cache): its batches carry token ids, so the empty caption must too;
    # a caption drawn anew at every draw (shuffle_caption, tag dropout) has no one embedding to cache.
    embeds_cached = (
        cfg.cache_text and not cfg.text_encoder_trains and not cfg.streaming and not options.per_draw
    )
    tokenizer, xl = parts.tokenizer, is_xl(parts)
    tokenize = functools.partial(token_ids, tokenizer)  # captions -> (B, L) ids; picklable for workers
    layout = DataLayout(transform, vae.latent_channels, factor, options)
    if cfg.aspect_buckets:  # the training rows only: the held-out batch stays square (one tensor)
        layout.transform = bucket_transform(resolution, vae, cfg.bucket_step, cfg.bucket_min_side,
                                            cfg.bucket_max_side, cfg.bucket_no_upscale, cfg.random_crop,
                                            cfg.seed)  # fmt: skip

    def examples_of(source: str, flips: tuple[bool, ...], limit: int | None = None) -> TrainingExamples:
        rows, listed = rows_for(cfg, source)
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        # Every image checked now (decoded, unless an earlier run did): a bad one is skipped or stops the
        # run before step 0, never in the middle of an epoch.
        report = Path(cfg.output_dir) / ("bad_files_val.txt" if limit else "bad_files.txt")
        rows = clean_rows(rows, cfg.image_column, cfg.caption_column, resolution, tokenizer, cfg.bad_data,
                          report if acc.is_main_process else None, acc.print,
                          DecodedImages(cache.root) if cfg.cache_latents else None,
                          max_pixels=cfg.max_image_pixels)  # fmt: skip
        if acc.is_main_process:  # what caption_rows found odd joins clean_rows' report
            append_problems(report, listed)
        captions = [caption_text(c) for c in rows[cfg.caption_column]]
        trained = not limit
        texts = fixed_captions(captions, options if trained else held_out_options(options), cfg.seed)
        input_ids = tokenize(texts)
        input_ids_2 = token_ids(parts.tokenizer_2, texts) if xl else None  # SDXL's second tokenizer
        buckets = trained and isinstance(layout.transform, BucketTransform)
        if trained:
            layout.read(rows, captions, cfg.image_column)
        transform_here = layout.transform if trained else transform
        # Split misses among one machine's processes: a cache folder local to each machine fills too.
        rank, world_size = acc.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes))
        latent_files = embed_files = None
        if cfg.cache_latents:
            with tqdm(desc="encoding latents", unit="image", disable=not acc.is_local_main_process) as bar:
                if buckets:  # one bucket at a time: a VAE batch holds images of one size
                    latent_files, missing = cache_bucket_latents(
                        cache, rows, cfg.image_column, layout.transform, layout.bucket_of_rows, parts.vae,
                        flips, cfg.train_batch_size, rank, world_size, bar.update,
                    )  # fmt: skip
                else:
                    latent_files, missing = cache_latents(
                        cache, rows, cfg.image_column, transform, parts.vae, flips, cfg.train_batch_size,
                        rank, world_size, bar.update,
                    )  # fmt: skip
            acc.print(f"{source}: {len(rows)} images x {len(flips)} flips, {missing} latents computed")
        if embeds_cached and xl:  # one entry per caption: both encoders' states and the pooled embedding
            embed_files, missing = cache_text_xl(cache, input_ids, input_ids_2, parts.text_encoder,
                                                 parts.text_encoder_2, 64, rank, world_size)  # fmt: skip
            acc.print(f"{source}: {len(rows)} captions, {missing} text embeddings computed")
        elif embeds_cached:
            embed_files, missing = cache_text(cache, input_ids, parts.text_encoder, 64, rank, world_size)
            acc.print(f"{source}: {len(rows)} captions, {missing} text embeddings computed")
        acc.wait_for_everyone()  # every process's share of the cache is written
        examples = TrainingExamples(rows, cfg.image_column, transform_here, input_ids, latent_files,
                                    None if xl else embed_files,
                                    report=report if acc.is_main_process else None, log=acc.print,
                                    groups=layout.groups(len(rows)) if trained else None)  # fmt: skip
        if xl:  # each example's size/crop numbers, from its image's real size and crop; SDXL's text
            time_ids = time_ids_of(rows, cfg.image_column, transform_here)
            return ExamplesXL(examples, time_ids, input_ids_2, embed_files)
        return examples

    if cfg.streaming:  # the DataLoader comes from examples.loader(start_step, ...) in setup()
        from sdlite.data.streaming import StreamingExamples, load_stream, parquet_rows

        stream = load_stream(cfg.train_data_dir, cfg.image_column, cfg.caption_column,
                             allow_outside=cfg.allow_outside_paths)  # fmt: skip
        examples = StreamingExamples(stream, cfg.image_column, cfg.caption_column, transform, tokenizer,
                                     cfg.train_batch_size, cfg.seed, acc.num_processes, acc.process_index,
                                     cfg.gradient_accumulation_steps, cfg.random_flip, cfg.shuffle_buffer,
                                     num_items=parquet_rows(cfg.train_data_dir))  # fmt: skip
    else:
        examples = examples_of(training_source(cfg), (False, True) if cfg.random_flip else (False,))
    if xl:  # (embeds, pooled) of the empty caption, or both tokenizers' ids of it
        empty = tuple(x.to(acc.device) for x in empty_condition_xl(parts, embeds_cached))
    else:
        empty_ids = tokenize([""])
        empty = text_embeddings(parts.text_encoder, empty_ids)["embeds"] if embeds_cached else empty_ids
        empty = empty.to(acc.device)
    val = None
    if cfg.val_data_dir and cfg.val_count > 0:
        held_out = examples_of(cfg.val_data_dir, (False,), cfg.val_count)
        batch = torch.utils.data.default_collate([held_out[(i, False)] for i in range(len(held_out))])
        T, n = parts.scheduler.config.num_train_timesteps, len(held_out)
        generator = seeded_generator(cfg.seed, "validation", device=acc.device)
        timesteps = sorted({min(t, T - 1) for t in cfg.val_timesteps})
        val = {
            "batch": {k: v.to(acc.device) for k, v in batch.items()},
            "timesteps": timesteps,
            "noise": torch.randn((len(timesteps), n, *latent_shape), generator=generator, device=acc.device),
            "latent_noise": torch.randn((n, *latent_shape), generator=generator, device=acc.device),
        }
    return examples, empty, latent_shape, val, layout


# ---- photo sets: caption folders, repeats, caption handling, aspect buckets -----------------------------


def caption_options(cfg: TrainConfig) -> CaptionOptions:
    return CaptionOptions(cfg.shuffle_caption, cfg.keep_tokens, cfg.caption_prefix, cfg.caption_separator,
                          cfg.caption_tag_dropout_rate)  # fmt: skip


def held_out_options(options: CaptionOptions) -> CaptionOptions:
    """The held-out captions: the trigger word, never a shuffle (the validation loss must stay fixed)."""
    return CaptionOptions(caption_prefix=options.caption_prefix, separator=options.separator)


def fixed_captions(captions: list[str], options: CaptionOptions, seed: int) -> list[str]:
    """The captions to tokenize (and cache) once: as drawn when no draw changes them, else as written
    (``DrawnCaptions`` then draws each at every step)."""
    if options.per_draw or options == CaptionOptions(separator=options.separator):
        return captions
    return [draw_caption(c, options, seed, 0, 0) for c in captions]


def rows_for(cfg: TrainConfig, source: str):
    """The rows of a data source and what was found odd while listing them: DreamBooth's instance
    (and class) images, a caption folder (images with .txt/.caption files beside them, N_name repeat
    folders) through ``caption_rows``, anything else through ``load_rows`` (nothing listed)."""
    if cfg.instance_data_dir and source == cfg.instance_data_dir:  # DreamBooth's subject and class images
        rows = dreambooth_rows(cfg.instance_data_dir, cfg.instance_prompt, cfg.class_data_dir,
                               cfg.class_prompt, cfg.image_column, cfg.caption_column,
                               allow_outside=cfg.allow_outside_paths)  # fmt: skip
        return rows, []
    if is_caption_folder(source):
        return caption_rows(
            source, cfg.image_column, cfg.caption_column, allow_outside=cfg.allow_outside_paths
        )
    rows = load_rows(source, cfg.image_column, cfg.caption_column, bad_data=cfg.bad_data,
                     allow_outside=cfg.allow_outside_paths)  # fmt: skip
    return rows, []


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


def sampler_for(
    cfg: TrainConfig, acc, examples: TrainingExamples, layout: DataLayout, start_step: int, tokenizer
):
    """The batch sampler of the training rows and the dataset it indexes: StepSampler over the
    examples, or (buckets, repeats or per-draw captions) a BucketSampler, its captions drawn per item
    by ``DrawnCaptions``. With buckets the main process writes output_dir/buckets.json and logs the counts."""
    split = (cfg.train_batch_size, cfg.seed, cfg.max_steps, start_step, acc.num_processes, acc.process_index,
             cfg.gradient_accumulation_steps)  # fmt: skip
    if layout.plain:
        return StepSampler(len(examples), *split, random_flip=cfg.random_flip), examples
    sampler = BucketSampler(layout.bucket_of_rows, *split, random_flip=cfg.random_flip,
                            repeats=layout.repeats, num_rows=len(examples),
                            draw_keys=layout.options.per_draw)  # fmt: skip
    if layout.bucket_of_rows is not None:
        counts = bucket_counts(layout.bucket_of_rows, layout.transform.buckets)
        if acc.is_main_process:
            write_buckets_json(Path(cfg.output_dir) / "buckets.json", counts)
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
                    f"those shapes to {cfg.class_data_dir} (class images are generated in the subject's "
                    "shapes only while the folder holds fewer than num_class_images), or turn "
                    "aspect_buckets off"
                )
        sampler = PriorPairSampler(sampler, layout.class_rows, cfg.seed, class_buckets=class_buckets)
    if layout.options.per_draw:
        tokenize = functools.partial(token_ids, tokenizer)
        examples = DrawnCaptions(examples, layout.captions, tokenize, layout.options, cfg.seed)
    return sampler, examples


# ---- DreamBooth ---------------------------------------------------------------------------------------


def training_source(cfg: TrainConfig) -> str:
    """Where the training rows come from: DreamBooth's instance folder (``rows_for`` adds the class
    folder), else train_data_dir."""
    return cfg.instance_data_dir or cfg.train_data_dir


@torch.no_grad()
def top_up_class_images(cfg: TrainConfig, acc, parts) -> None:
    """Generate the class images class_data_dir lacks (of num_class_images) with the base model, before
    any adapter is attached, on the main process while the others wait. Image i comes from its own seed
    (sdlite.data.dreambooth.generate_class_images), so a run stopped half-way makes the same images.
    With aspect_buckets they are made in the subject photos' bucket sizes, in proportion to them
    (class_image_sizes): each step's class half is drawn from its own bucket."""
    if not cfg.class_data_dir:
        return
    missing = class_images_needed(cfg.class_data_dir, cfg.num_class_images)
    if acc.is_main_process and missing:
        sizes, shapes = None, ""
        if cfg.aspect_buckets:  # the bucket set build_examples makes
            vae = parts.vae.config
            resolution, sides = cfg.resolution or vae.sample_size, (cfg.bucket_min_side, cfg.bucket_max_side)
            buckets = bucket_transform(resolution, vae, cfg.bucket_step, *sides).buckets
            sizes = class_image_sizes(
                cfg.instance_data_dir, cfg.class_data_dir, buckets, cfg.num_class_images
            )
            shapes = " in the subject's shapes " + ", ".join(
                f"{w}x{h}: {n}" for (w, h), n in Counter(sizes).items()
            )
        acc.print(
            f"generating {missing} class images ({cfg.class_prompt!r}) into {cfg.class_data_dir}{shapes}"
        )
        pipe = sampling_pipeline(parts)
        modes = [(m, m.training) for m in (parts.unet, parts.text_encoder)]
        for module, _ in modes:
            module.eval()

        def make_images(prompts: list[str], seeds: list[int], size) -> list:
            generators = [torch.Generator(acc.device).manual_seed(s) for s in seeds]
            steps, guidance = cfg.validation_inference_steps, cfg.validation_guidance
            width, height = size or (None, None)  # None: the model's size
            return pipe(prompts, width=width, height=height, num_inference_steps=steps,
                        guidance_scale=guidance, generator=generators, output_type="pil").images  # fmt: skip

        try:
            generate_class_images(cfg.class_data_dir, cfg.class_prompt, cfg.num_class_images, make_images,
                                  cfg.sample_batch_size, cfg.seed, sizes)  # fmt: skip
        finally:
            for module, training in modes:
                module.train(training)
    acc.wait_for_everyone()  # every process reads the finished folder
