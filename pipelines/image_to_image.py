"""Image to image (SDEdit, Meng et al. 2022): start the reverse process from the image, not from noise.

An image's latents x_0 are noised to x_t ~ q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) (Ho et al. 2020,
eq. 4) with t the first of the last ``strength`` share of the schedule's steps, and the text-to-image
recipe denoises from there: strength 1 keeps nothing of the image but its noise's mean, a low
strength changes little more than the details.

``ImageStart`` holds the stages that differ from text to image (``prepare_inputs``: the image as a
tensor; ``start``: the shortened schedule and x_t), for SD and SDXL alike; everything else is the
text-to-image pipeline's. Conventions follow diffusers' ``StableDiffusionImg2ImgPipeline``: the image
is resized to a multiple of the VAE's factor by ``VaeImageProcessor``, z is drawn from the VAE's
posterior with the call's generator (one per image when a list), then the noise, so the same weights,
scheduler and generator give the same images. One difference is deliberate: with one image per prompt
and several images per prompt, each prompt's images start from its own image (diffusers cycles the
images against prompts ordered [p0, p0, p1, p1]).
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from pipelines import image_inputs
from pipelines.sampling import Start
from pipelines.text_to_image import TextToImagePipeline
from sdlite import latents as latent_codec


class ImageStart:
    """The image-to-image stages over a text-to-image pipeline (SD or SDXL): see the module docstring."""

    @property
    def image_processor(self) -> VaeImageProcessor:
        """diffusers' resizing and [0, 1] -> [-1, 1] scaling of PIL images, arrays and tensors (the
        VAE's factor's, unless one was set, as diffusers' tests and users may)."""
        default = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, vae_latent_channels=self._vae_channels()
        )
        return self.__dict__.get("_image_processor") or default

    @image_processor.setter
    def image_processor(self, processor: VaeImageProcessor) -> None:
        self.__dict__["_image_processor"] = processor

    def _vae_channels(self) -> int:
        return self.vae.config.latent_channels if getattr(self, "vae", None) is not None else 4

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        """The image as a (B, 3, H, W) tensor in [-1, 1] (latents pass as given); its size is the call's."""
        image_inputs.check_image("image", c.image, latent_channels=self._vae_channels())
        c.image = self.image_processor.preprocess(c.image)
        f = self.vae_scale_factor if c.image.shape[1] == self._vae_channels() else 1
        c.height, c.width = c.image.shape[-2] * f, c.image.shape[-1] * f

    def check_inputs(self, args: dict) -> int:
        """The text-to-image checks, then strength and the number of images."""
        num_prompts = super().check_inputs(args)
        custom = args["timesteps"] if args["timesteps"] is not None else args["sigmas"]
        steps = len(custom) if custom is not None else args["num_inference_steps"]
        image_inputs.check_strength(args["strength"], None if self._hands_off(args) else steps)
        num_images = num_prompts * args["num_images_per_prompt"]
        image_inputs.check_image_count("image", len(args["image"]), num_prompts, num_images)
        return num_prompts

    @staticmethod
    def _hands_off(args: dict) -> bool:
        """Whether the call continues another model's denoising (SDXL's ensemble of experts: its
        ``denoising_start``), so that the image is x_t already, not an x_0 to noise."""
        return args.get("denoising_start") is not None

    def start(self, c: SimpleNamespace, num_images: int, dtype, device) -> Start:
        """x_t ~ q(x_t | x_0) (eq. 4) at the first of the last ``strength`` share of the timesteps;
        given latents, or a handed-off image's latents, are x_t as they are."""
        timesteps = self.strength_timesteps(c)
        if getattr(c, "latents", None) is not None:
            return Start(timesteps, c.latents.to(device=device, dtype=dtype))
        x0 = self.image_latents(c.image, num_images, dtype, device, c.generator)
        if self._hands_off(vars(c)):
            return Start(timesteps, x0)
        noise = randn_tensor(x0.shape, generator=c.generator, device=device, dtype=dtype)
        return Start(timesteps, self.scheduler.add_noise(x0, noise, timesteps[:1].repeat(num_images)))

    def strength_timesteps(self, c: SimpleNamespace) -> torch.Tensor:
        """The last int(steps x strength) steps of the schedule set for this call.

        ``steps`` is num_inference_steps, or the length of a custom schedule; a scheduler that calls
        the U-Net several times a step (Heun: order 2) has that many timesteps per step. The
        scheduler is told where it begins, since multistep ones index their state by step.
        """
        custom = c.timesteps is not None or c.sigmas is not None
        steps = len(self.scheduler.timesteps) if custom else c.num_inference_steps
        skipped = (steps - min(int(steps * c.strength), steps)) * self.scheduler.order
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(skipped)
        return self.scheduler.timesteps[skipped:]

    def image_latents(
        self, image: torch.Tensor, num_images: int, dtype, device, generator=None
    ) -> torch.Tensor:
        """(num_images, C, h, w) latents x_0 of ``image`` (one, one per prompt or one per image made).

        A list of generators draws each image's z with its own generator, as diffusers does.
        """
        image = image.to(device=device, dtype=dtype)
        if isinstance(generator, list):
            image = self._per_image(image, num_images)
        x0 = image if image.shape[1] == self._vae_channels() else self.encode_image(image, generator)
        return self._per_image(x0, num_images)

    @staticmethod
    def _per_image(batch: torch.Tensor, num_images: int) -> torch.Tensor:
        """One entry per image made, from one for all, one per prompt or one per image."""
        if len(batch) == 1:
            return batch.repeat(num_images, *[1] * (batch.ndim - 1))
        return batch.repeat_interleave(num_images // len(batch), dim=0)  # each prompt's images after its own

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generator=None) -> torch.Tensor:
        """x_0 = scaling_factor (z - shift), z ~ q(z | image), drawn with ``generator`` (or one per image)."""
        if isinstance(generator, list):
            return torch.cat([self.encode_image(p[None], g) for p, g in zip(pixels, generator)])
        out = self.vae.encode(pixels.to(self.vae.dtype))
        # AutoencoderKL returns a posterior to draw from; a tiny autoencoder (TAESD) its latents.
        z = out.latent_dist.sample(generator) if hasattr(out, "latent_dist") else out.latents
        return latent_codec.to_latents(z, self.vae.config).to(pixels.dtype)


class ImageToImagePipeline(ImageStart, TextToImagePipeline):
    """pipe(prompt, image, strength) -> StableDiffusionPipelineOutput(images, nsfw_content_detected).

    The text-to-image recipe and stages (``TextToImagePipeline``) from ``ImageStart``'s x_t.
    """

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        image=None,
        strength: float = 0.8,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
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
        """Redraw ``image`` toward ``prompt``; arguments as diffusers' SD image-to-image pipeline.

        image: a PIL image, array or tensor in [0, 1] (or a list of them; or latents, used as x_0),
            one for all images, one per prompt or one per image made; its size is the output's,
            rounded down to a multiple of the VAE's factor.
        strength: how much to change, in [0, 1]: the share of the schedule's steps that run, from
            x_t ~ q(x_t | x_0) at the first of them (1: from all but pure noise).
        The rest is as in ``TextToImagePipeline.__call__``.
        """
        call = {name: value for name, value in locals().items() if name != "self"}
        return self._generate({**call, "height": None, "width": None, "latents": None})
