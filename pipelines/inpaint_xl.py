"""Stable Diffusion XL inpainting: the inpainting stages (``InpaintStart``) on the SDXL recipe.

The SDXL parts are image to image's (``XLImageStart``: ``denoising_start`` for an ensemble of
experts, the refiner's aesthetic-score conditioning, a float16 VAE encoding in float32); the rest is
``InpaintStart``'s (an ordinary or an inpainting U-Net, ``strength``, ``padding_mask_crop``, mask blur)
over ``TextToImageXLPipeline``. Conventions follow diffusers' ``StableDiffusionXLInpaintPipeline``,
whose strength defaults to 0.9999 (just short of pure noise, so the image's colours still show
through), so the same weights, scheduler and generator give the same images.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from pipelines.image_to_image_xl import XLImageStart
from pipelines.inpaint import InpaintStart
from pipelines.text_to_image_xl import TextToImageXLPipeline


class InpaintXLPipeline(InpaintStart, XLImageStart, TextToImageXLPipeline):
    """pipe(prompt, image, mask_image) -> ImagePipelineOutput(images) for SDXL, with an ordinary or an
    inpainting U-Net."""

    _callback_tensor_inputs = [*TextToImageXLPipeline._callback_tensor_inputs, *InpaintStart.mask_inputs]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 0.9999,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_start: float | None = None,
        denoising_end: float | None = None,
        guidance_scale: float = 7.5,
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
        """Repaint the white part of ``mask_image`` in ``image``; the arguments are those of diffusers'
        ``StableDiffusionXLInpaintPipeline``: the image and mask ones as in ``InpaintPipeline.__call__``,
        denoising_start / aesthetic scores as in ``ImageToImageXLPipeline.__call__``, the rest as in
        ``TextToImageXLPipeline.__call__``."""
        return self._generate({name: value for name, value in locals().items() if name != "self"})
