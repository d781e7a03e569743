"""The configs of sdlite's two trainers: what each entry point takes, with its defaults.

``RunConfig`` holds the fields both trainers share (data, optimisation, output, faults), written once;
``TrainConfig`` (training/train.py, the latent U-Net) and ``VAETrainConfig`` (training/train_vae.py)
add their own and may give a shared field another default. Each field's trailing comment is its
``--help`` text and each comment line above a run of fields its section (training/config.py reads
them), so a field's description lives only here. ``FOREIGN_FLAGS`` maps the keys of diffusers'
training scripts (examples/text_to_image) to ours, so that ``max_train_steps:`` in a YAML file fails
naming ``--max_steps`` (on the command line their flags are read as ours: training/foreign_flags.py).

This module imports neither torch nor any model library, so that a command line can parse and print
``--help`` in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from sdlite.presets import PRESETS, Preset, PresetXL
from training.checks import SEEDS, counts_below, numbers_outside, text_problems
from training.config import ConfigError
from training.sample_prompts import prompts_file_problems

# sdlite.lora's UNET_TARGETS and TEXT_ENCODER_TARGETS, written out so as not to import torch and peft
# here (tests/test_train.py keeps them equal): the attention projections LoRA adapts by default.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# The settings that shape an adapter: one changed without lora true is a contradiction.
LORA_KEYS = (
    "lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_text_encoder",
    "lora_text_encoder_target_modules", "text_encoder_lr", "lora_save_format", "lora_from_scratch",
)  # fmt: skip


def _default(f) -> object:
    return f.default_factory() if f.default is MISSING else f.default


# diffusers' flag -> ours ("--name ..."), or why sdlite has none.
DIFFUSERS_FLAGS = {
    "max_train_steps": "--max_steps",
    "num_train_epochs": "--max_steps (sdlite counts optimizer steps, not epochs)",
    "checkpointing_steps": "--checkpoint_every",
    "resume_from_checkpoint": "--resume (latest or a checkpoint folder)",
    "dataset_name": "--train_data_dir (a local folder or file: sdlite downloads nothing)",
    "logging_dir": "logs always go to output_dir/logs",
    "scale_lr": "set --learning_rate to the rate you want",
    "push_to_hub": "sdlite uploads nothing; upload final_dir with huggingface_hub if you wish",
    "enable_xformers_memory_efficient_attention": "attention already runs torch's fused SDPA kernels",
}
# kohya's sd-scripts' names for what sdlite has (reported as sd-scripts' names).
SD_SCRIPTS_FLAGS = {
    "sample_prompts": "sd-scripts: --validation_prompts_file",
    "sample_every_n_steps": "sd-scripts: --validation_every",
}
UNET_FLAGS = {
    "pretrained_model_name_or_path": "--pretrained (a local diffusers-layout folder)",
    "rank": "--lora_rank (with --lora true)",
    "validation_prompt": "--validation_prompts (each flag value one prompt)",
    "validation_epochs": "--validation_every (in optimizer steps)",
    "use_ema": "--ema_decay (a decay such as 0.9999; none turns the EMA off)",
    "center_crop": "--random_crop false (the centre crop is the default)",
}


@dataclass
class RunConfig:
    """What every sdlite trainer takes."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS

    # The model
    preset: str = "tiny"  # the sdlite.presets architecture, built with random weights
    # Data: an image folder with metadata.jsonl, a save_to_disk folder, or a CSV/parquet/JSON-lines file.
    train_data_dir: str = "data/shapes/train"  # the training data
    image_column: str = "image"  # the column of images (files, paths or bytes)
    resolution: int | None = None  # the image side in pixels; None: the model's sample_size
    # Optimisation: steps are optimizer steps.
    seed: int = 0  # every random draw of the run follows from it (the initial weights, the data order, noise)
    max_steps: int = 1000  # optimizer steps to train for, in all
    train_batch_size: int = 32  # images per process per micro-step
    learning_rate: float = 1e-4  # AdamW's peak rate
    lr_scheduler: str = "constant"  # any diffusers.optimization schedule, in optimizer steps
    lr_warmup_steps: int = 0  # steps of linear warm-up from 0
    adam_weight_decay: float = 1e-2  # AdamW's decoupled weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0: no clipping
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: accelerate's config decides
    # Output, logging, checkpoints
    output_dir: str = "runs/train"  # the run's folder: config.yaml, checkpoints, logs/
    log_every: int = 50  # steps between logged means (also when the loop syncs with the device)
    report_to: str | None = "tensorboard"  # an accelerate tracker: "tensorboard", "wandb", ...; none
    checkpoint_every: int = 500  # steps between checkpoints (one at the end too); 0: none
    checkpoints_total_limit: int | None = 3  # keep the newest this many checkpoints; None: all
    resume: str | None = None  # "latest" (output_dir's newest checkpoint, if any) or a checkpoint folder
    # Faults (README: Reliability)
    nonfinite_loss: str = "skip"  # a NaN/inf loss or gradient: "skip" the step, or "stop" the run
    collective_timeout: float = 600.0  # seconds a process waits for the others (start-up: >= 30 min)
    # Run-folder safety and data reliability (README: Reliability): what a resume may change, where
    # images may live, how large they may be.
    allow_config_change: list[str] = field(default_factory=list)  # keys --resume may also change
    allow_outside_paths: bool = False  # image paths in a table may point outside the table's folder
    max_image_pixels: int | None = None  # most pixels an image may declare; None: 64 x resolution², >= 4096²

    def problems(self) -> list[str]:
        """What is wrong with the settings, in words; empty when they are fine."""
        problems = []
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            problems.append(f"mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16")
        problems += counts_below(self, 1, "max_steps", "train_batch_size", "log_every", "resolution")
        problems += counts_below(self, 1, "checkpoints_total_limit")  # 0 read as "keep all", -1 deleted
        problems += counts_below(self, 0, "lr_warmup_steps", "checkpoint_every")
        if self.seed not in SEEDS:
            problems.append(f"seed={self.seed}: use a whole number from 0 to {SEEDS[-1]} (default 0)")
        problems += numbers_outside(self, "learning_rate", above=True)
        problems += numbers_outside(self, "adam_weight_decay", "max_grad_norm")
        problems += self.lr_scheduler_problems()
        if self.nonfinite_loss not in ("skip", "stop"):
            problems.append(f"nonfinite_loss={self.nonfinite_loss!r}: use skip or stop")
        problems += numbers_outside(self, "collective_timeout", above=True)  # seconds
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            problems.append(f"max_image_pixels={self.max_image_pixels} must be >= 1 (or none: the default)")
        return problems

    def lr_scheduler_problems(self) -> list[str]:
        from diffusers.optimization import SchedulerType  # here: this module imports no torch

        names = [kind.value for kind in SchedulerType]
        return (
            [] if self.lr_scheduler in names else [f"lr_scheduler={self.lr_scheduler!r}: use one of {names}"]
        )

    def check(self) -> None:
        """ConfigError listing every problem, one a line, before anything is built or read."""
        problems = self.problems()
        if problems:
            raise ConfigError("\n".join(f"bad training config: {problem}" for problem in problems))


@dataclass
class TrainConfig(RunConfig):
    """Train the latent U-Net (and optionally the text encoder) of a text-to-image model."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS | UNET_FLAGS | SD_SCRIPTS_FLAGS

    # The model: a preset from scratch, or a pretrained diffusers-layout folder.
    preset: str = "tiny"  # the sdlite.presets model to build with random weights (when pretrained is None)
    pretrained: str | None = None  # a diffusers-layout folder to fine-tune
    vae_path: str | None = None  # an AutoencoderKL folder (train_vae.py's output_dir/vae) replacing the VAE
    train_text_encoder: bool = False  # train the CLIP text encoder with the U-Net (embeddings not cached)
    text_encoder_layers: int | None = None  # from scratch: the preset's text encoder with this many layers
    unet_block_out_channels: list[int] | None = None  # from scratch: the preset's U-Net, these level widths
    unet_mid_block: bool = True  # from scratch: false builds the preset's U-Net without its middle block
    unet_layers_per_block: list[int] | None = None  # from scratch: ResNet blocks per level's down block
    prediction_type: str | None = None  # "epsilon" or "v_prediction"; None: the scheduler's
    rescale_betas_zero_snr: bool = False  # zero terminal SNR (Lin et al. 2023); also sets trailing spacing
    # Data
    caption_column: str = "text"  # the column of captions
    random_crop: bool = False  # one random square per image (from seed and index); else centre crop
    random_flip: bool = False  # flip left-right with probability 1/2 (both flips are cached)
    caption_dropout: float = 0.0  # probability of the empty caption, for classifier-free guidance
    cache_latents: bool = True  # encode each image once, keep mean and std of q(z|x) on disk
    cache_text: bool = True  # cache the text embeddings too (only while the text encoder is frozen)
    cache_dir: str = "~/.cache/sdlite"  # where the latent and text caches live (shared between runs)
    dataloader_num_workers: int = 0  # DataLoader worker processes; 0: load in the training process
    streaming: bool = False  # stream train_data_dir's shards, nothing cached (sdlite/data/streaming.py)
    shuffle_buffer: int = 1000  # streaming: rows held for shuffling (more: a better shuffle, more memory)
    # Optimisation: the global batch is train_batch_size x processes x gradient_accumulation_steps.
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    adam_beta1: float = 0.9  # AdamW's β1
    adam_beta2: float = 0.999  # AdamW's β2
    adam_epsilon: float = 1e-8  # AdamW's ε
    use_8bit_adam: bool = False  # bitsandbytes' AdamW8bit
    snr_gamma: float | None = None  # min-SNR-γ loss weights (Hang et al. 2023); 5 is the paper's
    noise_offset: float = 0.0  # ε += offset * N(0, I) per (sample, channel) (Guttenberg 2023)
    ema_decay: float | None = 0.9999  # the EMA of the weights that final_dir holds; None: no EMA
    # Speed
    allow_tf32: bool = True  # TF32 matmuls on Ampere and later GPUs
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, slower
    compile: bool = False  # torch.compile the U-Net
    channels_last: bool = False  # the U-Net's activations in channels-last memory layout
    # Validation, output
    final_dir: str | None = None  # the trained model's folder; None: output_dir/final
    validation_prompts: list[str] = field(  # prompts sampled into validation/step-N.png; on the command line
        default_factory=list  # each value is one prompt, commas and all: give several, or repeat the flag
    )
    validation_prompts_file: str | None = (  # a text file of prompts sampled after validation_prompts, one a
        None  # line, sd-scripts' format: "a red circle --n blurry --s 30 --l 4.5 --d 7 --w 64 --h 32"
    )
    validation_every: int = 0  # steps between validations; 0: only at the end
    validation_inference_steps: int = 50  # sampling steps of the validation images
    validation_guidance: float = 7.5  # classifier-free guidance scale of the validation images
    val_data_dir: str | None = None  # held-out data for the validation loss (same formats as train)
    val_count: int = 64  # held-out items used
    val_timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])  # validation loss t
    # LoRA: train low-rank adapters on the frozen model instead of its weights (learning_rate is the
    # U-Net adapter's). The update is (lora_alpha / lora_rank) B A; alpha None means alpha = rank.
    lora: bool = False  # train LoRA adapters (Hu et al. 2021) instead of the weights
    lora_rank: int = 4  # r, the adapters' rank
    lora_alpha: float | None = None  # α; the update is scaled by α / r; None: α = r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target_modules: list[str] = field(default_factory=lambda: list(UNET_TARGETS))  # U-Net attention
    lora_text_encoder: bool = False  # an adapter on the text encoder too (embeddings are then not cached)
    lora_text_encoder_target_modules: list[str] = field(  # the text encoder's attention projections
        default_factory=lambda: list(TEXT_ENCODER_TARGETS)
    )
    text_encoder_lr: float | None = None  # the text encoder adapter's learning rate; None: learning_rate
    lora_from_scratch: bool = False  # with lora and no pretrained: adapt a preset's random weights (tests)
    # Faults
    bad_data: str = "skip"  # unreadable images: "skip" them (listed in output_dir/bad_files.txt) or "error"
    # LoRA files (with --lora true): the diffusers layout is always written; kohya's too on request.
    lora_save_format: str = "diffusers"  # "kohya": also final_dir/lora_kohya.safetensors (A1111, ComfyUI)
    # Photo sets: kohya's sd-scripts layouts. A train_data_dir of images with a .txt or
    # .caption file beside each (no metadata file) is read as captions, its N_name folders repeating
    # their images N times per epoch (sdlite/data/captions.py, buckets.py).
    aspect_buckets: bool = False  # group images by aspect ratio into buckets of about resolution² pixels
    bucket_min_side: int | None = None  # the shortest bucket side in pixels; None: resolution / 2
    bucket_max_side: int | None = None  # the longest bucket side in pixels; None: resolution * 2
    bucket_step: int | None = None  # bucket sides step by this many pixels (kohya's bucket_reso_steps), a
    # multiple of the VAE factor; None: 8 latent pixels, at most resolution / 8 (docs/data.md)
    bucket_no_upscale: bool = False  # each image's bucket is its own size, scaled down to resolution² pixels
    # if larger, sides rounded down to bucket_step: never enlarged (kohya's; min/max sides unused)
    shuffle_caption: bool = False  # shuffle a caption's comma-separated tags at every draw (no text cache)
    keep_tokens: int = 0  # with shuffle_caption: the caption's first N tags stay in place
    caption_prefix: str = ""  # a trigger word put first in every caption (the validation loss captions too)
    caption_tag_dropout_rate: float = 0.0  # leave each tag (after keep_tokens) out this often at each draw
    caption_separator: str = ","  # what splits a caption into tags: "," for tag lists, " " for the words
    # DreamBooth (Ruiz et al. 2023): teach a subject from a few photos, train_data_dir unused; with
    # class_data_dir each batch adds as many class images, kept by the prior-preservation loss.
    instance_data_dir: str | None = None  # the subject's photos (any image folder); None: no DreamBooth
    instance_prompt: str = ""  # the caption of every subject photo, with a rare token: "a photo of sks dog"
    class_data_dir: str | None = None  # class images; topped up to num_class_images by the base model
    class_prompt: str = ""  # the class images' caption and generating prompt: "a photo of a dog"
    num_class_images: int = 100  # class images wanted; those missing are generated before training
    prior_loss_weight: float = 1.0  # the class images' loss weight (Ruiz et al. eq. 2's λ)
    sample_batch_size: int = 4  # images per batch when generating class images (validation_inference_steps)

    @property
    def text_encoder_trains(self) -> bool:
        """Whether gradients reach the text encoder: trained whole, or through its LoRA adapter."""
        return self.train_text_encoder or (self.lora and self.lora_text_encoder)

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            problems.append(f"prediction_type={self.prediction_type!r}: use epsilon or v_prediction")
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.gradient_accumulation_steps < 1:
            problems.append("gradient_accumulation_steps must be >= 1")
        problems += counts_below(self, 0, "dataloader_num_workers", "validation_every")
        problems += counts_below(self, 1, "shuffle_buffer", "val_count")
        problems += numbers_outside(self, "adam_beta1", "adam_beta2", "ema_decay", high=1)
        problems += numbers_outside(
            self, "adam_epsilon", "snr_gamma", "lora_alpha", "text_encoder_lr", above=True
        )
        problems += numbers_outside(self, "noise_offset", "validation_guidance", "prior_loss_weight")
        problems += self.validation_problems()
        problems += self.text_encoder_layers_problems() + self.unet_shape_problems()
        if self.lora and self.train_text_encoder:
            problems.append("lora with train_text_encoder: LoRA trains no base weight; use lora_text_encoder")
        if self.lora and (self.lora_rank < 1 or not 0 <= self.lora_dropout < 1):
            problems.append(
                f"lora_rank {self.lora_rank} must be >= 1, lora_dropout {self.lora_dropout} in [0, 1)"
            )
        if self.bad_data not in ("skip", "error"):
            problems.append(f"bad_data={self.bad_data!r}: use skip or error")
        if self.lora_save_format not in ("diffusers", "kohya"):
            problems.append(f"lora_save_format={self.lora_save_format!r}: use diffusers or kohya")
        problems += prompts_file_problems(self.validation_prompts_file)
        return problems + self.photo_set_problems() + self.lora_contradictions()

    def validation_problems(self) -> list[str]:
        """What is wrong with the validation keys that would only show at the first validation."""
        problems = text_problems(
            self, "validation_prompts", "instance_prompt", "class_prompt", "caption_prefix"
        )
        empty = [i + 1 for i, prompt in enumerate(self.validation_prompts) if not prompt.strip()]
        if empty:
            problems.append(f"validation_prompts item(s) {empty} empty: remove them (or the stray comma)")
        if not 1 <= self.validation_inference_steps <= 1000:  # as a prompts file's --s
            problems.append(
                f"validation_inference_steps={self.validation_inference_steps}: use 1 to 1000 (default 50)"
            )
        if not self.val_timesteps or not all(0 <= t < 1000 for t in self.val_timesteps):
            problems.append(
                f"val_timesteps={self.val_timesteps}: use timesteps from 0 to 999, e.g. 100,500,900"
            )
        return problems

    def lora_contradictions(self) -> list[str]:
        """LoRA settings on a run that trains no adapter, and an adapter on random weights not asked for."""
        if not self.lora:
            changed = [f for f in fields(self) if getattr(self, f.name) != _default(f)]
            given = [f.name for f in changed if f.name in LORA_KEYS]
            if given:
                return [f"{', '.join(given)} set without lora: a run without it trains the weights "
                        "themselves, not an adapter: add --lora true, or leave them out"]  # fmt: skip
        elif not self.pretrained and not self.lora_from_scratch:
            return [
                f"lora without pretrained: adapters on the {self.preset} preset's random weights "
                "teach nothing to keep: give --pretrained FOLDER (--lora_from_scratch true: a test)"
            ]
        return []

    def text_encoder_layers_problems(self) -> list[str]:
        layers = self.text_encoder_layers
        if layers is None:
            return []
        if layers < 0:
            return [f"text_encoder_layers={layers} must be >= 0 (or none: the preset's)"]
        if self.pretrained:
            return ["text_encoder_layers: for a text encoder built from scratch; pretrained ones keep theirs"]
        if layers == 0 and self.lora and self.lora_text_encoder:
            return ["lora_text_encoder on a 0-layer text encoder: it has no attention for an adapter"]
        return []

    def unet_shape_problems(self) -> list[str]:
        """What is wrong with the from-scratch U-Net's shape keys: widths, middle block, layers."""
        channels, layers = self.unet_block_out_channels, self.unet_layers_per_block
        if self.pretrained:  # these keys shape a U-Net built from a preset: name each one given
            scratch, keeps = "a U-Net built from scratch", "a pretrained one keeps its own"
            problems = []
            if channels is not None:
                problems.append(f"unet_block_out_channels: for {scratch}; {keeps}")
            if not self.unet_mid_block:
                problems.append(f"unet_mid_block: false is for {scratch}; {keeps}")
            if layers is not None:
                problems.append(f"unet_layers_per_block: for {scratch}; {keeps}")
            return problems
        preset = PRESETS.get(self.preset)  # an unknown one is refused when built; SDXL's in sdxl_step.py
        if preset is None or isinstance(preset, PresetXL):
            return []
        if channels is not None and (problems := preset.channels_problems("unet", channels)):
            return problems
        return [] if layers is None else self.shaped_preset(preset).unet_layers_problems(layers)

    def shaped_preset(self, preset: Preset) -> Preset:
        """An SD preset with this config's from-scratch shape keys applied: what load_model builds."""
        if self.text_encoder_layers is not None:
            preset = preset.with_text_encoder_layers(self.text_encoder_layers)
        if self.unet_block_out_channels is not None:
            preset = preset.with_unet_channels(self.unet_block_out_channels)
        if not self.unet_mid_block:
            preset = preset.without_unet_mid_block()
        if self.unet_layers_per_block is not None:
            preset = preset.with_unet_layers(self.unet_layers_per_block)
        return preset

    def photo_set_problems(self) -> list[str]:
        """What is wrong with the photo-set and DreamBooth settings (captions, buckets, class images)."""
        problems = []
        if self.streaming and (
            self.aspect_buckets
            or self.shuffle_caption
            or self.caption_prefix
            or self.caption_tag_dropout_rate
        ):
            problems.append(
                "aspect_buckets, shuffle_caption, caption_tag_dropout_rate and caption_prefix read every row "
                "first: not with streaming"
            )
        if self.streaming and self.instance_data_dir:
            problems.append("instance_data_dir (DreamBooth) reads a folder of photos: not with streaming")
        if self.class_data_dir and not self.instance_data_dir:
            problems.append("class_data_dir without instance_data_dir: give the subject's photos too")
        if self.instance_data_dir and not self.instance_prompt.strip():
            problems.append("instance_data_dir without instance_prompt: e.g. 'a photo of sks dog'")
        if self.class_data_dir and not self.class_prompt.strip():
            problems.append("class_data_dir without class_prompt: e.g. --class_prompt 'a photo of a dog'")
        if self.num_class_images < 0 or self.sample_batch_size < 1:
            problems.append("num_class_images must be >= 0, sample_batch_size >= 1")
        if self.keep_tokens < 0:
            problems.append(f"keep_tokens={self.keep_tokens} must be >= 0")
        if not 0 <= self.caption_tag_dropout_rate < 1:
            problems.append(f"caption_tag_dropout_rate={self.caption_tag_dropout_rate} must be in [0, 1)")
        if not self.caption_separator:
            problems.append('caption_separator is empty: "," splits tag lists, " " the words of a sentence')
        for name in ("bucket_min_side", "bucket_max_side"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (or none)")
        problems += counts_below(self, 1, "bucket_step")
        if self.bucket_no_upscale and self.class_data_dir and self.aspect_buckets:
            problems.append(
                "bucket_no_upscale with class_data_dir: each subject photo's bucket is its own size, which "
                "the class images need not share; use bucket_step / bucket_min_side without it"
            )
        return problems


@dataclass
class VAETrainConfig(RunConfig):
    """Train the preset's AutoencoderKL from scratch on an image folder."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS | {
        "pretrained_model_name_or_path": "train_vae.py trains the --preset's VAE from random weights",
    }

    # The model
    preset: str = "tiny"  # the sdlite.presets VAE to build with random weights
    vae_block_out_channels: list[int] | None = None  # the preset's VAE with these level widths (same f)
    vae_mid_block_attention: bool = True  # false: the middle blocks without their self-attention
    # Data
    eval_data_dir: str | None = None  # held-out images for PSNR; None: hold out eval_count of train
    eval_count: int = 256  # images held out of train_data_dir when eval_data_dir is None
    # Optimisation: a VAE at a constant rate can end on a loss spike; cosine decays to 0 at max_steps.
    max_steps: int = 600
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    adam_weight_decay: float = 0.0
    reconstruction_loss: str = "mse"  # "mse" or "l1"
    kl_weight: float = 1e-6  # the weight of KL(q(z|x) ‖ N(0, I)) against the reconstruction loss
    # Output, logging, checkpoints
    output_dir: str = "runs/tiny-vae"
    scale_count: int = 1024  # training images encoded to measure the latents' std
    log_every: int = 100
    eval_every: int = 0  # steps between held-out PSNR reports; 0: only at the end
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = 2

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.reconstruction_loss not in ("mse", "l1"):
            problems.append(f"reconstruction_loss={self.reconstruction_loss!r}: use mse or l1")
        problems += counts_below(self, 1, "eval_count", "scale_count") + counts_below(self, 0, "eval_every")
        problems += numbers_outside(self, "kl_weight")
        preset = PRESETS.get(self.preset)  # an unknown one is refused when built
        if preset is not None and self.vae_block_out_channels is not None:
            problems += preset.channels_problems("vae", self.vae_block_out_channels)
        return problems

    def shaped_preset(self, preset: Preset) -> Preset:
        """The preset with this config's VAE shape keys applied: what train_vae.py builds."""
        if self.vae_block_out_channels is not None:
            preset = preset.with_vae_channels(self.vae_block_out_channels)
        if not self.vae_mid_block_attention:
            preset = preset.without_vae_mid_attention()
        return preset
