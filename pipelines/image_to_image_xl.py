"""Stable Diffusion XL image to image: SDEdit (``ImageStart``) on the SDXL text-to-image recipe.

What SDXL adds to the SD image-to-image stages (``XLImageStart``, shared with SDXL inpainting):

- ``denoising_start``: the second half of an ensemble of experts (Podell et al. 2023, sec. 2.5). The
  call takes over at the timestep where a base model's ``denoising_end`` stopped, its latents passed
  as ``image`` (``output_type="latent"``), and neither noises them nor heeds ``strength``.
- the refiner's conditioning: with ``requires_aesthetics_score`` (SDXL refiner's config) the U-Net's
  time ids are (original size, crop, aesthetic score) instead of (original size, crop, target size);
  ``negative_aesthetic_score`` conditions the unconditional half.
- a float16 VAE whose config sets ``force_upcast`` encodes in float32, as it decodes.

Conventions follow diffusers' ``StableDiffusionXLImg2ImgPipeline``, so the same weights, scheduler
and generator give the same images; as in ``TextToImageXLPipeline`` the negative_* size conditioning
applies when both negative sizes are given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from pipelines.image_to_image import ImageStart
from pipelines.inputs import _describe, _is_real
from pipelines.text_to_image_xl import TextToImageXLPipeline
from sdlite.models_xl import check_folder_xl


class XLImageStart(ImageStart):
    """The SDXL parts of the image stages over ``TextToImageXLPipeline``: see the module docstring."""

    _denoising_start = None
    denoising_start = property(lambda self: self._denoising_start)

    def __init__(
        self,
        vae,
        text_encoder,
        text_encoder_2,
        tokenizer,
        tokenizer_2,
        unet,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        requires_aesthetics_score: bool = False,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        """``TextToImageXLPipeline``'s parts and config, and the refiner's requires_aesthetics_score
        (diffusers reads the parts from this signature)."""
        super().__init__(
            vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder,
            feature_extractor, force_zeros_for_empty_prompt, add_watermarker,
        )  # fmt: skip
        self.register_to_config(requires_aesthetics_score=requires_aesthetics_score)

    @classmethod
    def _check_folder(cls, path, kwargs: dict) -> Path:
        """An SDXL folder, base or refiner (``check_folder_xl(refiner=True)``)."""
        return check_folder_xl(path, weights=kwargs.get("variant") is None, pickled=True, refiner=True)

    def save_pretrained(self, save_directory, safe_serialization: bool = True, **kwargs) -> Path:
        """``TextToImageXLPipeline.save_pretrained``, keeping requires_aesthetics_score in
        model_index.json (a refiner saved without it would load conditioned on sizes instead); a
        refiner's folder names diffusers' image-to-image pipeline, the one of its own there."""
        path = super().save_pretrained(save_directory, safe_serialization=safe_serialization, **kwargs)
        index = json.loads((path / "model_index.json").read_text())
        index["requires_aesthetics_score"] = bool(self.config.get("requires_aesthetics_score"))
        if self.text_encoder is None:
            index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return path

    def check_inputs(self, args: dict) -> int:
        """The SD image and SDXL checks, then denoising_start before denoising_end."""
        start, end = args["denoising_start"], args["denoising_end"]
        if start is not None and not _is_real(start, 0, 1):
            raise ValueError(f"denoising_start must be None or a number in [0, 1], got {_describe(start)}")
        if start is not None and end is not None and _is_real(end) and start >= end:
            raise ValueError(
                f"denoising_start={start} must be below denoising_end={end}: the call runs between"
            )
        self._denoising_start = start
        return super().check_inputs(args)

    def strength_timesteps(self, c: SimpleNamespace) -> torch.Tensor:
        """The timesteps below (1 - denoising_start) T when the call takes over from a base model,
        else the last ``strength`` share; the scheduler is told where it begins. Those past
        denoising_end are dropped here already, so that inpainting's last step puts back x_0 itself."""
        if c.denoising_start is None:
            return self._truncated(super().strength_timesteps(c))
        steps = self.scheduler.config.num_train_timesteps
        cutoff = int(round(steps - c.denoising_start * steps))
        count = int((self.scheduler.timesteps < cutoff).sum())
        if self.scheduler.order == 2 and count % 2 == 0:  # Heun's steps come in pairs after the first
            count += 1
        skipped = len(self.scheduler.timesteps) - count
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(skipped)
        return self._truncated(self.scheduler.timesteps[skipped:])

    @property
    def num_time_ids(self) -> int:
        """Five with requires_aesthetics_score (size, crop, score), else SDXL's six."""
        return super().num_time_ids - bool(self.config.get("requires_aesthetics_score"))

    def time_ids(self, c: SimpleNamespace, negative: bool = False) -> torch.Tensor:
        """The refiner's (original size, crop, aesthetic score) with ``requires_aesthetics_score``,
        else SDXL's six size/crop numbers."""
        if not self.config.get("requires_aesthetics_score"):
            return super().time_ids(c, negative)
        size = (c.height, c.width)
        if negative:
            ids = (c.negative_original_size or c.original_size or size, c.negative_crops_coords_top_left)
            score = c.negative_aesthetic_score
        else:
            ids, score = (c.original_size or size, c.crops_coords_top_left), c.aesthetic_score
        return torch.tensor([*ids[0], *ids[1], score], dtype=torch.float32)

    def encode_image(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        with self._vae_upcast():  # SDXL's VAE overflows in float16
            return super().encode_image(pixels, generator)


class ImageToImageXLPipeline(XLImageStart, TextToImageXLPipeline):
    """pipe(prompt, image, strength) -> ImagePipelineOutput(images) for SDXL (base or refiner)."""

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 5.0,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        aesthetic_score: float = 6.0,
        negative_aesthetic_score: float = 2.5,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress: bool = True,
    ):
        """Redraw ``image`` toward ``prompt``; the arguments are those of diffusers'
        ``StableDiffusionXLImg2ImgPipeline``.

        image and strength: as in ``ImageToImagePipeline.__call__``.
        denoising_start: take over from a base model at this fraction of the schedule (``image``:
            its latents); strength is then ignored. denoising_end: stop at this fraction.
        latents: x_t to start from instead of the noised image.
        aesthetic_score / negative_aesthetic_score: the refiner's conditioning (with
            requires_aesthetics_score), for the prompt's and the unconditional half.
        The rest is as in ``TextToImageXLPipeline.__call__``.
        """
        call = {name: value for name, value in locals().items() if name != "self"}
        return self._generate({**call, "height": None, "width": None})
