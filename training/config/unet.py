"""The U-Net trainer's config, section by section: what training/train.py takes, with its defaults.

``TrainConfig`` is made of sections (training/config/sections.py): the model, data, captions and
buckets, optimizer, LoRA, DreamBooth, validation and run sections, the data, optimizer and run ones
extending those both trainers share (training/config/shared.py). Each key's help text is its
``option``'s; each section's ``problems`` checks its own keys, and ``TrainConfig.cross_problems`` the
settings of several sections together. ``FOREIGN_FLAGS`` maps
the keys of diffusers' and kohya's training scripts to ours, so that ``max_train_steps:`` in a YAML
file fails naming ``--max_steps`` (on the command line their flags are read as ours:
training/foreign_flags.py).

This module imports neither torch nor any model library (see training/config/__init__.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import MISSING, dataclass, fields
from typing import ClassVar

from sdlite.presets import PRESETS, Preset
from training.checks import counts_below, numbers_outside, text_problems
from training.config.distill import DistillSection
from training.config.dreambooth import DreamBoothSection
from training.config.inpaint import InpaintSection, inpaint_contradictions
from training.config.inversion import TextualInversionSection
from training.config.lora import LoraSection
from training.config.sections import Config, Section, option, section
from training.config.shared import (
    DIFFUSERS_FLAGS,
    SD_SCRIPTS_FLAGS,
    UNET_FLAGS,
    DataBase,
    OptimizerBase,
    RunBase,
)
from training.config.validation import ValidationSection

# Memory levers' values (training/optim.py).
OPTIMIZER_KERNELS = ("fused", "foreach", "loop")


def _default(f) -> object:
    return f.default_factory() if f.default is MISSING else f.default


# ---- the U-Net trainer ------------------------------------------------------------------------------------


@dataclass
class ModelSection(Section):
    title = "The model"
    about = "a preset from scratch, or a pretrained diffusers-layout folder"

    preset: str = option(
        "tiny", "the sdlite.presets model to build with random weights (when pretrained is None)"
    )
    pretrained: str | None = option(None, "a diffusers-layout folder to fine-tune")
    vae_path: str | None = option(
        None, "an AutoencoderKL folder (train_vae.py's output_dir/vae) replacing the VAE"
    )
    train_text_encoder: bool = option(
        False, "train the CLIP text encoder with the U-Net (embeddings not cached)"
    )
    text_encoder_layers: int | None = option(
        None, "from scratch: the preset's text encoder with this many layers"
    )
    unet_block_out_channels: list[int] | None = option(
        None, "from scratch: the preset's U-Net, these level widths"
    )
    unet_mid_block: bool = option(
        True, "from scratch: false builds the preset's U-Net without its middle block"
    )
    unet_layers_per_block: list[int] | None = option(
        None, "from scratch: ResNet blocks per level's down block"
    )
    prediction_type: str | None = option(None, '"epsilon" or "v_prediction"; None: the scheduler\'s')
    rescale_betas_zero_snr: bool = option(
        False, "zero terminal SNR (Lin et al. 2023); also sets trailing spacing"
    )

    def problems(self) -> list[str]:
        problems = []
        if self.prediction_type not in (None, "epsilon", "v_prediction"):
            problems.append(f"prediction_type={self.prediction_type!r}: use epsilon or v_prediction")
        return problems + self.text_encoder_layers_problems() + self.unet_shape_problems()

    def text_encoder_layers_problems(self) -> list[str]:
        layers = self.text_encoder_layers
        if layers is None:
            return []
        if layers < 0:
            return [f"text_encoder_layers={layers} must be >= 0 (or none: the preset's)"]
        if self.pretrained:
            return ["text_encoder_layers: for a text encoder built from scratch; pretrained ones keep theirs"]
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
        # An unknown preset is refused when built; one the keys do not reshape (SDXL's) by its family.
        preset = PRESETS.get(self.preset)
        if preset is None or not preset.reshapeable:
            return []
        if channels is not None and (problems := preset.channels_problems("unet", channels)):
            return problems
        return [] if layers is None else self.shaped_preset(preset).unet_layers_problems(layers)

    def shaped_preset(self, preset: Preset) -> Preset:
        """An SD preset with this section's from-scratch shape keys applied: what the SD family builds."""
        if self.text_encoder_layers is not None:
            preset = preset.with_text_encoder_layers(self.text_encoder_layers)
        if self.unet_block_out_channels is not None:
            preset = preset.with_unet_channels(self.unet_block_out_channels)
        if not self.unet_mid_block:
            preset = preset.without_unet_mid_block()
        if self.unet_layers_per_block is not None:
            preset = preset.with_unet_layers(self.unet_layers_per_block)
        return preset


@dataclass
class DataSection(DataBase):
    caption_column: str = option("text", "the column of captions")
    random_crop: bool = option(False, "one random square per image (from seed and index); else centre crop")
    random_flip: bool = option(False, "flip left-right with probability 1/2 (both flips are cached)")
    caption_dropout: float = option(0.0, "probability of the empty caption, for classifier-free guidance")
    cache_latents: bool = option(True, "encode each image once, keep mean and std of q(z|x) on disk")
    cache_text: bool = option(True, "cache the text embeddings too (only while the text encoder is frozen)")
    cache_dir: str = option("~/.cache/sdlite", "where the latent and text caches live (shared between runs)")
    dataloader_num_workers: int = option(0, "DataLoader worker processes; 0: load in the training process")
    streaming: bool = option(
        False, "stream train_data_dir's shards, nothing cached (sdlite/data/streaming.py)"
    )
    shuffle_buffer: int = option(
        1000, "streaming: rows held for shuffling (more: a better shuffle, more memory)"
    )
    bad_data: str = option(
        "skip", 'unreadable images: "skip" them (listed in output_dir/bad_files.txt) or "error"'
    )
    # Memory (docs/training.md: Fitting a card).
    release_encoders: bool = option(
        False,
        "LoRA with cached latents and text: free the VAE and text encoders once the cache is filled "
        "(no validation images then)",
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if not 0 <= self.caption_dropout < 1:
            problems.append(f"caption_dropout={self.caption_dropout} must be in [0, 1)")
        if self.bad_data not in ("skip", "error"):
            problems.append(f"bad_data={self.bad_data!r}: use skip or error")
        problems += counts_below(self, 0, "dataloader_num_workers")
        return problems + counts_below(self, 1, "shuffle_buffer") + self.release_problems()

    def release_problems(self) -> list[str]:
        """release_encoders frees what encodes the data: every example must come from the cache."""
        if self.release_encoders and (self.streaming or not (self.cache_latents and self.cache_text)):
            return ["release_encoders needs cache_latents and cache_text true and no streaming: the VAE and "
                    "text encoders are freed once the cache holds every example"]  # fmt: skip
        return []


@dataclass
class CaptionSection(Section):
    title = "Photo sets"
    about = (
        "kohya's sd-scripts layouts. A train_data_dir of images with a .txt or .caption file beside each "
        "(no metadata file) is read as captions, its N_name folders repeating their images N times per "
        "epoch (sdlite/data/captions.py, buckets.py)."
    )

    aspect_buckets: bool = option(
        False, "group images by aspect ratio into buckets of about resolution² pixels"
    )
    bucket_min_side: int | None = option(None, "the shortest bucket side in pixels; None: resolution / 2")
    bucket_max_side: int | None = option(None, "the longest bucket side in pixels; None: resolution * 2")
    bucket_step: int | None = option(
        None,
        "bucket sides step by this many pixels (kohya's bucket_reso_steps), a multiple of the VAE factor; "
        "None: 8 latent pixels, at most resolution / 8 (docs/data.md)",
    )
    bucket_no_upscale: bool = option(
        False,
        "each image's bucket is its own size, scaled down to resolution² pixels if larger, sides rounded "
        "down to bucket_step: never enlarged (kohya's; min/max sides unused)",
    )
    shuffle_caption: bool = option(
        False, "shuffle a caption's comma-separated tags at every draw (no text cache)"
    )
    keep_tokens: int = option(0, "with shuffle_caption: the caption's first N tags stay in place")
    caption_prefix: str = option(
        "", "a trigger word put first in every caption (the validation loss captions too)"
    )
    caption_tag_dropout_rate: float = option(
        0.0, "leave each tag (after keep_tokens) out this often at each draw"
    )
    caption_separator: str = option(
        ",", 'what splits a caption into tags: "," for tag lists, " " for the words'
    )

    @property
    def read_first(self) -> bool:  # every row read before training: not with streaming
        return bool(
            self.aspect_buckets
            or self.shuffle_caption
            or self.caption_prefix
            or self.caption_tag_dropout_rate
        )

    def problems(self) -> list[str]:
        problems = []
        if self.keep_tokens < 0:
            problems.append(f"keep_tokens={self.keep_tokens} must be >= 0")
        if not 0 <= self.caption_tag_dropout_rate < 1:
            problems.append(f"caption_tag_dropout_rate={self.caption_tag_dropout_rate} must be in [0, 1)")
        if not self.caption_separator:
            problems.append('caption_separator is empty: "," splits tag lists, " " the words of a sentence')
        for name in ("bucket_min_side", "bucket_max_side"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (or none)")
        return problems + counts_below(self, 1, "bucket_step")


@dataclass
class OptimizerSection(OptimizerBase):
    about = "the global batch is train_batch_size x processes x gradient_accumulation_steps"

    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step")
    adam_beta1: float = option(0.9, "AdamW's β1")
    adam_beta2: float = option(0.999, "AdamW's β2")
    adam_epsilon: float = option(1e-8, "AdamW's ε")
    use_8bit_adam: bool = option(False, "bitsandbytes' AdamW8bit")
    snr_gamma: float | None = option(None, "min-SNR-γ loss weights (Hang et al. 2023); 5 is the paper's")
    noise_offset: float = option(0.0, "ε += offset * N(0, I) per (sample, channel) (Guttenberg 2023)")
    ema_decay: float | None = option(0.9999, "the EMA of the weights that final_dir holds; None: no EMA")
    # Memory (docs/training.md: Fitting a card).
    optimizer_kernel: str = option(
        "fused",
        'AdamW\'s step: "fused" (one kernel; foreach where the device has none), "foreach" (a few ops '
        'over all tensors, temporaries as large as the parameters) or "loop" (one tensor at a time)',
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.gradient_accumulation_steps < 1:
            problems.append("gradient_accumulation_steps must be >= 1")
        problems += numbers_outside(self, "adam_beta1", "adam_beta2", "ema_decay", high=1)
        problems += numbers_outside(self, "adam_epsilon", "snr_gamma", above=True)
        return problems + numbers_outside(self, "noise_offset") + self.kernel_problems()

    def kernel_problems(self) -> list[str]:
        if self.optimizer_kernel not in OPTIMIZER_KERNELS:
            return [f"optimizer_kernel={self.optimizer_kernel!r}: use one of {', '.join(OPTIMIZER_KERNELS)}"]
        if self.use_8bit_adam and self.optimizer_kernel != "fused":
            return [f"optimizer_kernel={self.optimizer_kernel} with use_8bit_adam: bitsandbytes' AdamW8bit "
                    "has its own kernel; leave optimizer_kernel out"]  # fmt: skip
        if self.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:  # found, not imported
            return ["use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or sdlite[bnb]), or set "
                    "use_8bit_adam false"]  # fmt: skip
        return []


@dataclass
class RunSection(RunBase):
    about = "the run's folder, logging, checkpoints, faults (README: Reliability), speed"

    final_dir: str | None = option(None, "the trained model's folder; None: output_dir/final")
    allow_tf32: bool = option(True, "TF32 matmuls on Ampere and later GPUs")
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass: less memory, slower"
    )
    compile: bool = option(False, "torch.compile the U-Net")
    channels_last: bool = option(False, "the U-Net's activations in channels-last memory layout")


@dataclass
class TrainConfig(Config):
    """Train the latent U-Net (and optionally the text encoder) of a text-to-image model."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS | UNET_FLAGS | SD_SCRIPTS_FLAGS

    model: ModelSection = section(ModelSection)
    data: DataSection = section(DataSection)
    captions: CaptionSection = section(CaptionSection)
    optimizer: OptimizerSection = section(OptimizerSection)
    adapters: LoraSection = section(LoraSection)
    inversion: TextualInversionSection = section(TextualInversionSection)
    dreambooth: DreamBoothSection = section(DreamBoothSection)
    validation: ValidationSection = section(ValidationSection)
    run: RunSection = section(RunSection)
    distillation: DistillSection = section(DistillSection)
    inpaint: InpaintSection = section(InpaintSection)

    @property
    def text_encoder_trains(self) -> bool:
        """Whether gradients reach the text encoder: trained whole, through its LoRA adapter, or to a new
        word's vectors (textual inversion)."""
        lora = self.adapters.lora and self.adapters.lora_text_encoder
        return self.model.train_text_encoder or lora or self.inverts

    @property
    def inverts(self) -> bool:
        """Whether the run is textual inversion: a new word's vectors the only trained weights."""
        return self.inversion.textual_inversion_token is not None

    def cross_problems(self) -> list[str]:
        model, lora, data, dreambooth = self.model, self.adapters, self.data, self.dreambooth
        # Prompt texts a command line that was not UTF-8 left with a stray byte, in one place and order.
        problems = text_problems(self.validation, "validation_prompts")
        problems += text_problems(dreambooth, "instance_prompt", "class_prompt")
        problems += text_problems(self.captions, "caption_prefix")
        if lora.lora and model.train_text_encoder:
            problems.append("lora with train_text_encoder: LoRA trains no base weight; use lora_text_encoder")
        if model.text_encoder_layers == 0 and not model.pretrained and lora.lora and lora.lora_text_encoder:
            problems.append("lora_text_encoder on a 0-layer text encoder: it has no attention for an adapter")
        if data.streaming and self.captions.read_first:
            problems.append(
                "aspect_buckets, shuffle_caption, caption_tag_dropout_rate and caption_prefix read every row "
                "first: not with streaming"
            )
        if data.streaming and dreambooth.instance_data_dir:
            problems.append("instance_data_dir (DreamBooth) reads a folder of photos: not with streaming")
        if self.captions.bucket_no_upscale and dreambooth.class_data_dir and self.captions.aspect_buckets:
            problems.append(
                "bucket_no_upscale with class_data_dir: each subject photo's bucket is its own size, which "
                "the class images need not share; use bucket_step / bucket_min_side without it"
            )
        return (
            problems
            + self.lora_contradictions()
            + self.inversion_contradictions()
            + self.release_contradictions()
            + self.distill_contradictions()
            + inpaint_contradictions(self)
        )

    def inversion_contradictions(self) -> list[str]:
        """What textual inversion cannot be trained with: other trained weights, captions drawn per step."""
        if not self.inverts:
            return []
        others = [key for key, on in (("lora", self.adapters.lora), ("train_text_encoder",
                  self.model.train_text_encoder)) if on]  # fmt: skip
        problems = [f"textual_inversion_token with {key}: it trains the new word alone" for key in others]
        if not self.model.pretrained:
            problems.append("textual_inversion_token without pretrained: a word for random weights teaches "
                            "nothing to keep: give --pretrained FOLDER")  # fmt: skip
        if self.data.streaming or self.captions.shuffle_caption or self.captions.caption_tag_dropout_rate:
            problems.append(
                "textual_inversion_token with streaming, shuffle_caption or caption_tag_dropout_rate: "
                "captions tokenized as they are drawn are not spelt out to the word's tokens; turn them off"
            )
        return problems

    def release_contradictions(self) -> list[str]:
        """release_encoders on a run that needs an encoder after the cache is filled."""
        if not self.data.release_encoders:
            return []
        needs = [
            reason
            for reason, needed in (
                ("a full fine-tune writes them into final_dir: use lora true", not self.adapters.lora),
                ("a trained text encoder reads every caption", self.text_encoder_trains),
                ("validation images are decoded by the VAE from the text encoders' condition",
                 bool(self.validation.validation_prompts or self.validation.validation_prompts_file)),
                ("shuffle_caption and caption_tag_dropout_rate encode a new caption at every draw",
                 self.captions.shuffle_caption or bool(self.captions.caption_tag_dropout_rate)),
            )
            if needed
        ]  # fmt: skip
        return [f"release_encoders: {'; '.join(needs)}"] if needs else []

    def lora_contradictions(self) -> list[str]:
        """LoRA settings on a run that trains no adapter, and an adapter on random weights not asked for."""
        lora = self.adapters
        if not lora.lora:
            given = [
                f.name for f in fields(lora) if f.name != "lora" and getattr(lora, f.name) != _default(f)
            ]
            if given:
                return [f"{', '.join(given)} set without lora: a run without it trains the weights "
                        "themselves, not an adapter: add --lora true, or leave them out"]  # fmt: skip
        elif not self.model.pretrained and not lora.lora_from_scratch:
            return [
                f"lora without pretrained: adapters on the {self.model.preset} preset's random weights "
                "teach nothing to keep: give --pretrained FOLDER (--lora_from_scratch true: a test)"
            ]
        return []

    def distill_contradictions(self) -> list[str]:
        """What a distillation run cannot take, and lcm_* keys set on a run that does not distil."""
        section = self.distillation
        if not section.lcm:
            keys = [f.name for f in fields(section) if f.name != "distill"]
            given = [key for key in keys if getattr(section, key) != getattr(DistillSection(), key)]
            if given:
                return [f"{', '.join(given)} set without distill lcm: add --distill lcm, or leave them out"]
            return []
        problems = []
        if not self.model.pretrained:
            problems.append("distill lcm without pretrained: give the teacher, --pretrained FOLDER")
        if self.text_encoder_trains:
            problems.append(
                "distill lcm with train_text_encoder or lora_text_encoder: the teacher and the student read "
                "the same frozen text encoder; turn them off"
            )
        if self.data.caption_dropout:
            problems.append(
                "distill lcm with caption_dropout: the student learns the guided teacher on the captions "
                "themselves (the teacher's unconditional half is the empty caption anyway); set it to 0"
            )
        if self.optimizer.snr_gamma:
            problems.append(
                "distill lcm with snr_gamma: the consistency loss has no SNR weight; leave it out"
            )
        if self.inverts:
            problems.append(
                "distill lcm with textual_inversion_token: distil a model, or teach it a word; not both"
            )
        if self.dreambooth.class_data_dir:
            problems.append(
                "distill lcm with class_data_dir: prior preservation is not distilled; leave it out"
            )
        return problems
