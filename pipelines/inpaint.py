"""Inpainting: redraw the masked part of an image and keep the rest, with either kind of U-Net.

- An ordinary U-Net (4 input channels) knows nothing of masks, so the known region is imposed: after
  every step the latents outside the mask are replaced by the image's own sample of q(x_t | x_0)
  (Ho et al. 2020, eq. 4) at the next step's t, and by x_0 itself after the last (Lugmayr et al. 2022,
  "RePaint", without its resampling).
- An inpainting U-Net (SD's sd-v1-5-inpainting, SDXL's inpainting U-Net: 9 input channels) was
  trained to read the mask and the masked image's latents as five more input channels beside x_t,
  and draws the whole image itself.

Either way the reverse process starts where image to image does (``ImageStart``): from the image's
q(x_t | x_0) at ``strength`` < 1, or from pure noise at strength 1 (the default). ``padding_mask_crop``
inpaints only the mask's box, grown by that many pixels and scaled to the call's size, and pastes the
result back into the image; ``pipe.mask_processor.blur(mask, blur_factor)`` softens a mask's edge.
Both are diffusers' ``VaeImageProcessor``'s, and conventions follow diffusers'
``StableDiffusionInpaintPipeline`` (a mask is white where to paint, binarized at 0.5; the masked image
is encoded even for an ordinary U-Net, so the generator's draws come in the same order), so the same
weights, scheduler and generator give the same images.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from pipelines import image_inputs
from pipelines.image_to_image import ImageStart
from pipelines.sampling import Start
from pipelines.text_to_image import TextToImagePipeline


class InpaintStart(ImageStart):
    """The inpainting stages over a text-to-image pipeline (SD or SDXL): see the module docstring."""

    # What a step-end callback may also read and replace, as in diffusers: (N, 1, h, w) and (N, C, h, w),
    # doubled for guidance; an ordinary U-Net's put-back reads the mask, an inpainting U-Net both.
    mask_inputs = ("mask", "masked_image_latents")

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """diffusers' mask preparation: one grey channel in [0, 1], binarized at 0.5 (and ``blur``)."""
        default = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor,
            do_normalize=False,
            do_binarize=True,
            do_convert_grayscale=True,
        )
        return self.__dict__.get("_mask_processor") or default

    @mask_processor.setter
    def mask_processor(self, processor: VaeImageProcessor) -> None:
        self.__dict__["_mask_processor"] = processor

    @property
    def num_channels_latents(self) -> int:
        """x_t has the VAE's channels; an inpainting U-Net reads five more (the mask, the masked image)."""
        return self._vae_channels()

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        """Image and mask as tensors of the call's size (the U-Net's by default); with
        padding_mask_crop, of the mask's box grown by that many pixels."""
        image_inputs.check_image("image", c.image, latent_channels=self._vae_channels())
        image_inputs.check_image("mask_image", c.mask_image)
        image_inputs.check_mask_crop(c.padding_mask_crop, c.image, c.mask_image, c.output_type)
        c.height, c.width = self.resolve_size(c.height, c.width)
        crop, mode = self._crop(c.mask_image, c.height, c.width, c.padding_mask_crop)
        size = dict(height=c.height, width=c.width, crops_coords=crop, resize_mode=mode)
        c.image = self.image_processor.preprocess(c.image, **size).to(torch.float32)
        c.mask = self.mask_processor.preprocess(c.mask_image, **size)

    def _crop(self, mask_image, height: int, width: int, padding: int | None):
        if padding is None:
            return None, "default"
        return self.mask_processor.get_crop_region(mask_image, width, height, pad=padding), "fill"

    def check_inputs(self, args: dict) -> int:
        """The image-to-image checks (the U-Net's channels among them), then the mask and given latents."""
        num_prompts = super().check_inputs(args)
        num_images = num_prompts * args["num_images_per_prompt"]
        image_inputs.check_image_count("mask_image", len(args["mask"]), num_prompts, num_images)
        image_inputs.check_strength_start(args["strength"], args["latents"])
        return num_prompts

    def check_unet_inputs(self) -> None:
        """An ordinary U-Net (the VAE's C channels) or an inpainting one (2 C + 1)."""
        latent, unet = self._vae_channels(), self.unet.config.in_channels
        if unet not in (latent, 2 * latent + 1):
            raise ValueError(
                f"the U-Net takes {unet} input channels: inpainting needs an ordinary U-Net ({latent}) or an "
                f"inpainting one ({2 * latent + 1}: the latents, the mask and the masked image's latents)"
            )

    def start(self, c: SimpleNamespace, num_images: int, dtype, device) -> Start:
        """x_T ~ N(0, I) at strength 1 (or the given latents), else the image's q(x_t | x_0) (or a
        handed-off image's latents as they are); the mask and masked image's latents for an
        inpainting U-Net, or the known region's put-back for an ordinary one."""
        timesteps = self.strength_timesteps(c)
        ordinary = self.unet.config.in_channels == self._vae_channels()
        x0, hands_off = None, self._hands_off(vars(c))
        if ordinary or hands_off or (c.latents is None and c.strength < 1):
            x0 = self._per_image(self._image_x0(c.image, dtype, device, c.generator), num_images)
        shape = (
            num_images,
            self._vae_channels(),
            c.height // self.vae_scale_factor,
            c.width // self.vae_scale_factor,
        )
        if c.latents is not None:
            noise = c.latents.to(device=device, dtype=dtype)
        else:
            noise = randn_tensor(shape, generator=c.generator, device=device, dtype=dtype)
        if hands_off:
            latents = x0
        elif c.latents is not None or c.strength == 1:
            latents = noise * self.scheduler.init_noise_sigma
        else:
            latents = self.scheduler.add_noise(x0, noise, timesteps[:1].repeat(num_images))  # eq. 4
        mask = F.interpolate(c.mask, size=shape[-2:]).to(device=device, dtype=dtype)  # nearest: stays 0 or 1
        masked = c.masked_image_latents if c.masked_image_latents is not None else c.image * (c.mask < 0.5)
        masked = self._image_x0(masked, dtype, device, c.generator)
        mask, masked = (self._per_image(x, num_images) for x in (mask, masked))
        inputs = dict(zip(self.mask_inputs, (mask, masked)))
        if ordinary:
            return Start(timesteps, latents, inputs, after_step=self._put_back_known(x0, noise, timesteps))
        return Start(timesteps, latents, inputs, unet_reads=self.mask_inputs)

    def _encode_vae_image(self, image: torch.Tensor, generator=None) -> torch.Tensor:
        """``encode_image`` under diffusers' name, which code written for its inpainting pipelines calls."""
        return self.encode_image(image, generator)

    def _image_x0(self, image: torch.Tensor, dtype, device, generator) -> torch.Tensor:
        """Latents of each given image, the i-th drawn with generator i when a list (as diffusers)."""
        image = image.to(device=device, dtype=dtype)
        return image if image.shape[1] == self._vae_channels() else self.encode_image(image, generator)

    def _put_back_known(self, x0, noise, timesteps) -> Callable[[int, torch.Tensor, dict], torch.Tensor]:
        """after_step for an ordinary U-Net: outside the step's mask, x_{t'} = the image's
        q(x_{t'} | x_0) for the next step's t' (its x_0 after the last step), with the starting noise."""

        def put_back(i: int, latents: torch.Tensor, inputs: dict) -> torch.Tensor:
            last = i == len(timesteps) - 1
            known = x0 if last else self.scheduler.add_noise(x0, noise, timesteps[i + 1 : i + 2])
            mask = inputs["mask"][: len(latents)]  # doubled for guidance: its first half, as diffusers
            return (1 - mask) * known + mask * latents

        return put_back

    def _generate(self, call: dict):
        """The shared recipe; with padding_mask_crop the painted box is pasted back into the image."""
        out = super()._generate(call)
        if call["padding_mask_crop"] is None:
            return out
        height, width = self.resolve_size(call["height"], call["width"])
        crop, _ = self._crop(call["mask_image"], height, width, call["padding_mask_crop"])
        images = out.images if call["return_dict"] else out[0]
        pasted = [
            self.image_processor.apply_overlay(call["mask_image"], call["image"], im, crop) for im in images
        ]
        if not call["return_dict"]:
            return (pasted, *out[1:])
        out.images = pasted
        return out


class InpaintPipeline(InpaintStart, TextToImagePipeline):
    """pipe(prompt, image, mask_image) -> StableDiffusionPipelineOutput(images, nsfw_content_detected).

    The text-to-image recipe and stages (``TextToImagePipeline``) from ``InpaintStart``'s start, with
    an ordinary or an inpainting U-Net.
    """

    _callback_tensor_inputs = [*TextToImagePipeline._callback_tensor_inputs, *InpaintStart.mask_inputs]

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        mask_image=None,
        masked_image_latents: torch.Tensor | None = None,
        height: int | None = None,
        width: int | None = None,
        padding_mask_crop: int | None = None,
        strength: float = 1.0,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress: bool = True,
    ):
        """Repaint the white part of ``mask_image`` in ``image`` after ``prompt``; arguments as
        diffusers' SD inpainting pipeline.

        image / mask_image: PIL images, arrays or tensors in [0, 1] (or lists of them), one for all
            images, one per prompt or one per image made; resized to height x width (by default the
            U-Net's size). The mask is white (>= 0.5) where to paint.
        masked_image_latents: the masked image's latents for an inpainting U-Net, instead of
            encoding image x (mask < 0.5).
        padding_mask_crop: paint only the mask's bounding box grown by this many pixels (scaled to
            height x width), pasted back into the image (PIL image and mask, PIL output).
        strength: the share of the schedule's steps that run, from the image's q(x_t | x_0) (1: from
            pure noise, the default).
        latents: the starting noise x_T (strength 1 only).
        The rest is as in ``TextToImagePipeline.__call__``.
        """
        return self._generate({name: value for name, value in locals().items() if name != "self"})
