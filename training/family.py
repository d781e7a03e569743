"""A model family: everything the U-Net trainer must know about one kind of text-to-image model.

``UNetTrainer`` (train.py), the data setup (training/examples.py) and the class-image generator never
ask which model they train; they ask its family. ``StableDiffusion`` is SD 1.x/2.x (one CLIP text
encoder, c = its last hidden states) and the interface: a family builds or loads the model, names its
text encoders, turns captions into token ids, cache entries and the condition c of a batch (with the
empty caption where a caption is dropped), makes the denoiser ε_θ(x_t, t, c), puts LoRA adapters on it
and writes their file, makes the pipeline that samples it, and says which settings it cannot take
(``refusals``, read before any weight is). training/family_sdxl.py overrides the hooks that differ for
SDXL; training/families.py picks the family of a run.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL

from sdlite.data.cache import TensorCache, cache_text, text_embeddings
from sdlite.data.dataset import TrainingExamples
from sdlite.ddpm import DDPMScheduler
from sdlite.lora import LoraSettings, add_lora, cast_adapters_to_fp32, save_lora
from sdlite.models import build_components, check_compatible, load_components
from sdlite.presets import get_preset
from sdlite.tokenizer import token_ids
from training.stored_weights import store_frozen_weights
from training.unet_step import Denoiser

if TYPE_CHECKING:
    from training.config.lora import LoraSection
    from training.config.unet import ModelSection, TrainConfig


def weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def lora_settings(lora: LoraSection) -> LoraSettings:
    """sdlite.lora's settings of the LoRA section."""
    return LoraSettings(
        rank=lora.lora_rank,
        alpha=lora.lora_alpha,
        dropout=lora.lora_dropout,
        unet_targets=tuple(lora.lora_target_modules),
        text_encoder=lora.lora_text_encoder,
        text_encoder_targets=tuple(lora.lora_text_encoder_target_modules),
        kind=lora.lora_type,
        dora=lora.lora_dora,
    )


class Released:
    """A model freed after caching (release_encoders): its config stays, any other use says why not."""

    def __init__(self, name: str, config):
        self.name, self.config = name, config

    def __getattr__(self, attribute: str):
        raise AttributeError(
            f"the {self.name} was freed after caching (release_encoders true) and cannot be used for "
            f"{attribute!r}: set release_encoders false"
        )


class StableDiffusion:
    """SD 1.x and 2.x: one tokenizer and CLIP text encoder; c is its last hidden states (B, L, D)."""

    name = "SD 1.x/2.x"

    def __init__(self, parts):
        self.parts = parts  # sdlite.models.Components (or the family's own), unwrapped
        self.words: list[str] = []  # a textual-inversion word's tokens (training/textual_inversion.py)

    # ---- chosen from the config alone, before any weight is read ----------------------------------------

    @classmethod
    def claims(cls, model: ModelSection) -> bool:
        """Whether the run's model (its pretrained folder or its preset) is of this family."""
        return True  # the family of every folder and preset no other family claims

    @classmethod
    def refusals(cls, cfg: TrainConfig) -> list[str]:
        """The settings this family cannot take yet, each with what to do instead."""
        return []

    # ---- build, load, save -----------------------------------------------------------------------------

    @classmethod
    def build(cls, model: ModelSection, seed: int):
        """The preset's model with random weights, shaped by the config's from-scratch keys."""
        return build_components(model.shaped_preset(get_preset(model.preset)), seed=seed)

    @classmethod
    def load_folder(cls, path: str, inpainting: bool = False):
        return load_components(path, inpainting=inpainting)

    @classmethod
    def load(
        cls, model: ModelSection, seed: int, device: torch.device, inpainting: bool = False
    ) -> StableDiffusion:
        """The model: a preset's random init or a pretrained folder (with ``inpainting`` an inpainting
        U-Net's too), a separately trained VAE (with its own scaling factor), the scheduler options; the
        VAE (and the text encoders, unless trained) frozen. All on ``device``."""
        folder = model.pretrained and cls.load_folder(model.pretrained, inpainting)
        family = cls(folder or cls.build(model, seed))
        parts = family.parts
        if model.vae_path:
            path = Path(model.vae_path)
            path = path / "vae" if (path / "vae" / "config.json").is_file() else path
            parts.vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
            family.check_compatible(inpainting)
        overrides = {"prediction_type": model.prediction_type} if model.prediction_type else {}
        if model.rescale_betas_zero_snr:  # sampling must then start at t = T-1: trailing spacing (Lin et al.)
            overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        if overrides:
            parts.scheduler = DDPMScheduler.from_config(parts.scheduler.config, **overrides)
        parts.vae.requires_grad_(False).eval()
        for encoder in family.encoders.values():
            encoder.requires_grad_(model.train_text_encoder).train(model.train_text_encoder)
        # Frozen parts stay float32: autocast runs them in low precision, and they save intact.
        for module in (parts.vae, *family.encoders.values(), parts.unet):
            module.to(device)
        return family

    def check_compatible(self, inpainting: bool = False) -> None:
        """Refuse a replaced VAE whose latents the U-Net cannot read (or, ``inpainting``, with the mask)."""
        check_compatible(self.parts, inpainting)

    @property
    def encoders(self) -> dict[str, torch.nn.Module]:
        """The text encoders by folder name, in the order the denoiser takes them."""
        return {"text_encoder": self.parts.text_encoder}

    # ---- captions -> the condition c -------------------------------------------------------------------

    def token_ids(self, captions: list[str]) -> tuple[torch.Tensor, ...]:
        """(N, L) token ids of the captions, one tensor per tokenizer."""
        return (token_ids(self.parts.tokenizer, self.spelt(captions)),)

    def spelt(self, captions: list[str]) -> list[str]:
        """The captions with a textual-inversion word of n vectors spelt out to its n tokens, as the
        pipelines spell prompts (diffusers' ``maybe_convert_prompt``); as they are without one."""
        if len(self.words) < 2:
            return captions
        return [caption.replace(self.words[0], " ".join(self.words)) for caption in captions]

    def cache_text(self, cache: TensorCache, ids: tuple, rank: int, world_size: int) -> tuple[list[str], int]:
        """Cache each caption's condition; returns (one file per caption, entries computed)."""
        return cache_text(cache, ids[0], self.parts.text_encoder, 64, rank, world_size)

    def examples(self, rows, image_column: str, transform, ids: tuple, latent_files, embed_files, **options):
        """The dataset of the training or held-out rows: item (index, flip) -> a dict of its latents (or
        pixels) and its caption's token ids or cached condition."""
        return TrainingExamples(rows, image_column, transform, ids[0], latent_files, embed_files, **options)

    def empty_condition(self, cached: bool, device: torch.device):
        """The empty caption for caption dropout: its embeddings when the text is cached, else its ids."""
        ids = self.token_ids([""])[0]
        return (text_embeddings(self.parts.text_encoder, ids)["embeds"] if cached else ids).to(device)

    def condition(self, batch: dict, empty, drop: torch.Tensor, trains: bool):
        """c of a batch, the empty caption where ``drop``: cached embeddings, or token ids (encoded here
        when the encoder is frozen, by the denoiser when it trains)."""
        if "embeds" in batch:
            return torch.where(drop[:, None, None], empty, batch["embeds"])
        ids = torch.where(drop[:, None], empty, batch["input_ids"])
        if trains:
            return ids
        with torch.no_grad():
            return self.parts.text_encoder(ids)[0]

    def denoiser(self, trained_encoders: list, channels_last: bool) -> Denoiser:
        """ε_θ(x_t, t, c): the U-Net, with the trained text encoders in front (so DDP wraps them too)."""
        return Denoiser(self.parts.unet, *trained_encoders, channels_last=channels_last)

    def freeze_unread(self) -> None:
        """Freeze what never reaches the loss (DDP refuses a trained parameter without a gradient)."""

    # ---- LoRA ------------------------------------------------------------------------------------------

    def attach_lora(
        self, settings: LoraSettings, seed: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        """Freeze the U-Net and text encoders in ``dtype`` (fp16/bf16 under mixed precision, else fp32)
        and put fp32 adapters on them.

        Half-precision base weights halve the frozen model's memory; the adapters stay fp32 because
        Adam's small updates vanish when rounded to fp16/bf16 (and the fp16 grad scaler refuses fp16
        gradients). Autocast runs each layer in low precision; peft casts between the two dtypes.
        The adapters' random A comes from the run's seed, so two runs of one config start alike.
        """
        if dtype != torch.float32:
            self.parts.unet.to(dtype)
            self.parts.text_encoder.to(dtype)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            self.add_adapters(settings, dtype)
        for model in (self.parts.unet, *self.encoders.values()):
            cast_adapters_to_fp32(model)

    def add_adapters(self, settings: LoraSettings, dtype: torch.dtype) -> None:
        """Freeze the base and add the adapters, in an order that fixes each one's random init."""
        add_lora(self.parts.unet, self.parts.text_encoder, settings)

    # ---- memory (docs/training.md: Fitting a card) -----------------------------------------------------

    def store_base_weights(self, storage: str) -> int:
        """The frozen U-Net's Linear and Conv2d weights stored in ``storage`` ("bf16" or "fp8"), each
        layer upcast as it runs (training/stored_weights.py); its adapters stay fp32. Returns bytes saved."""
        return store_frozen_weights(self.parts.unet, storage)

    def release_encoders(self) -> None:
        """Free the VAE and text encoders once every example's latents and condition are cached; what
        stays of each is its config (the latents' scaling factor is the VAE's)."""
        for name in ("vae", *self.encoders):
            setattr(self.parts, name, Released(name, getattr(self.parts, name).config))

    def save_lora(self, path: Path, lora: LoraSection, base_model: str) -> None:
        """The adapters alone, in the file ``load_lora_weights`` reads, with the base model's name (a
        LoHa or LoKr in LyCORIS' layout alone: sdlite.lora.save_lora)."""
        te = self.parts.text_encoder if lora.lora_text_encoder else None
        save_lora(path, self.parts.unet, te, base_model=base_model, format=lora.lora_save_format)

    # ---- sampling --------------------------------------------------------------------------------------

    @classmethod
    def pipeline_class(cls, kind: str = "text"):
        """sdlite's pipeline class of this family for ``kind``: "text" (text to image: ``sdlite generate``
        loads a folder with it), "image" (image to image) or "inpaint"."""
        from pipelines import ImageToImagePipeline, InpaintPipeline, TextToImagePipeline  # sdlite never does

        return {"text": TextToImagePipeline, "image": ImageToImagePipeline, "inpaint": InpaintPipeline}[kind]

    def pipeline(self, kind: str = "text"):
        """sdlite's pipeline of the model for ``kind`` (``pipeline_class``'s), with a fresh DDPM
        scheduler, quiet."""
        scheduler = DDPMScheduler.from_config(self.parts.scheduler.config)
        pipe = self.pipeline_class(kind)(
            **{**self.parts.as_dict(), "scheduler": scheduler}, **self.pipeline_options()
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def pipeline_options(self) -> dict:
        return {}
