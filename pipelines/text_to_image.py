"""Text to image: prompt -> CLIP embeddings -> x_T ~ N(0, I) -> denoise with a scheduler -> VAE decode.

The reverse process is Ho et al. 2020's Algorithm 2 run by whichever scheduler the pipeline holds
(sdlite's DDPM by default, or any diffusers scheduler), steered by classifier-free guidance
(Ho & Salimans 2022, eq. 6): ε̃ = ε(x_t, ∅) + w (ε(x_t, c) - ε(x_t, ∅)), off when w <= 1.

Conventions follow diffusers' ``StableDiffusionPipeline`` so that the same weights, scheduler and
generator give the same images: the unconditional half comes first in the batch, the empty prompt
stands in for a missing negative prompt, x_T is drawn with ``randn_tensor`` and scaled by the
scheduler's ``init_noise_sigma``, and latents are divided by the VAE's ``scaling_factor`` to decode.

LoRA adapters (``sdlite.lora``, or any file in diffusers' layout) load through diffusers'
``StableDiffusionLoraLoaderMixin``: ``load_lora_weights``, ``set_adapters``, ``fuse_lora`` /
``unfuse_lora``, ``unload_lora_weights``; ``cross_attention_kwargs={"scale": s}`` multiplies every
active adapter's update, in the U-Net and the text encoder, by s for one call.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache

import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.pil_utils import numpy_to_pil
from diffusers.utils.torch_utils import randn_tensor
from peft.tuners.tuners_utils import BaseTunerLayer
from tqdm.auto import tqdm

from sdlite.lora import adapter_scale
from sdlite.pipelines.base import BasePipeline
from sdlite.pipelines.inputs import check_text_to_image_inputs

logger = logging.get_logger(__name__)


class TextToImagePipeline(BasePipeline, StableDiffusionLoraLoaderMixin):
    """pipe(prompt) -> ImagePipelineOutput(images): latent text-to-image, stage by stage.

    ``__call__`` is the recipe; each stage is a method named for its job and usable on its own:
    ``check_inputs``, ``encode_prompt``, ``prepare_latents``, ``denoise``, ``decode_latents``.
    """

    # ---- the recipe --------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress: bool = True,
    ):
        """Generate images for ``prompt`` (or ``prompt_embeds``); arguments as diffusers' SD pipeline.

        guidance_scale: w of classifier-free guidance; <= 1 turns it off (one U-Net pass per step).
        generator: a torch.Generator, or one per image, for exactly reproducible draws.
        output_type: "pil" (list of PIL images), "np" ((N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W)
            in [0, 1]) or "latent" (the denoised latents, before the VAE).
        cross_attention_kwargs: passed to the U-Net's attention processors, except "scale", the
            strength of the loaded LoRA adapters for this call (0: the base model, 1: as loaded).
        clip_skip: use the text encoder's output this many layers before the last (for both prompts).
        callback_on_step_end: f(pipe, step, t, {name: tensor}) called after each step with the tensors
            named in callback_on_step_end_tensor_inputs ("latents", "prompt_embeds"); a dict it
            returns replaces them.
        progress: False hides the progress bar for this call (set_progress_bar_config(disable=True)
            hides it for every call).
        Returns ImagePipelineOutput(images), or (images,) when return_dict is False.
        """
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height
        width = default_size if width is None else width
        num_prompts = self.check_inputs(
            prompt, height, width, num_inference_steps, timesteps, negative_prompt, num_images_per_prompt,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            callback_on_step_end_tensor_inputs, guidance_scale=guidance_scale, eta=eta,
            guidance_rescale=guidance_rescale, clip_skip=clip_skip,
        )  # fmt: skip
        num_images = num_prompts * num_images_per_prompt
        device = self._execution_device
        # A guidance-distilled U-Net takes w as an input (timestep_cond) and needs no second pass.
        guided = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        cross_attention_kwargs = dict(cross_attention_kwargs or {})
        lora_scale = cross_attention_kwargs.pop("scale", None)  # for the text encoder too, not only the U-Net

        with torch.inference_mode(), adapter_scale(self.unet, self.text_encoder, scale=lora_scale):
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, num_images_per_prompt, guided, negative_prompt,
                prompt_embeds, negative_prompt_embeds, clip_skip,
            )  # fmt: skip
            # One batch for both passes, built once: (2N, T, D) with the unconditional half first.
            context = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
            if timesteps is not None:
                self.scheduler.set_timesteps(timesteps=timesteps, device=device)
            else:
                self.scheduler.set_timesteps(num_inference_steps, device=device)
            latents = self.prepare_latents(
                num_images, height, width, context.dtype, device, generator, latents
            )
            latents = self.denoise(
                latents,
                context,
                self.scheduler.timesteps,
                guidance_scale=guidance_scale if guided else None,
                guidance_rescale=guidance_rescale,
                timestep_cond=self.guidance_embedding(guidance_scale, num_images, latents),
                step_kwargs=self.step_kwargs(generator, eta),
                cross_attention_kwargs=cross_attention_kwargs or None,
                callback=callback_on_step_end,
                callback_inputs=callback_on_step_end_tensor_inputs,
                progress=progress,
            )
            images = self.decode_latents(latents, output_type, generator)
        if isinstance(images, torch.Tensor):
            images = images.clone()  # a normal tensor: callers may change it in place
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    # ---- stages ------------------------------------------------------------------------------

    def check_inputs(
        self,
        prompt,
        height,
        width,
        num_inference_steps=50,
        timesteps=None,
        negative_prompt=None,
        num_images_per_prompt=1,
        generator=None,
        latents=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=("latents",),
        guidance_scale=7.5,
        eta=0.0,
        guidance_rescale=0.0,
        clip_skip=None,
    ) -> int:
        """Fail before any work with a ValueError naming the argument and what it allows.

        Returns the number of prompts. The checks themselves live in ``pipelines/inputs.py``.
        """
        return check_text_to_image_inputs(
            prompt, height, width, num_inference_steps, timesteps, negative_prompt, num_images_per_prompt,
            generator, latents, prompt_embeds, negative_prompt_embeds, output_type,
            callback_on_step_end_tensor_inputs, vae_factor=self.vae_scale_factor,
            latent_channels=self.unet.config.in_channels, embed_width=self.unet.config.cross_attention_dim,
            guidance_scale=guidance_scale, eta=eta, guidance_rescale=guidance_rescale, clip_skip=clip_skip,
            text_layers=self.text_encoder.config.num_hidden_layers,
        )  # fmt: skip

    @torch.no_grad()  # inference mode when called from __call__
    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (N * num_images_per_prompt, T, D).

        Prompt and negative prompt go through the text encoder in one batch. The negative side is
        None without guidance; with guidance and no negative prompt it is the empty prompt's.
        """
        num_prompts = len(prompt_embeds) if prompt is None else 1 if isinstance(prompt, str) else len(prompt)
        texts = []
        if prompt_embeds is None:
            texts += [prompt] if isinstance(prompt, str) else list(prompt)
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            texts += [negative_prompt] * num_prompts if isinstance(negative_prompt, str) else negative_prompt
        if texts:
            max_length = self.tokenizer.model_max_length if prompt_embeds is None else prompt_embeds.shape[1]
            embeds = self._encode_text(texts, max_length, device, clip_skip)
            if prompt_embeds is None:
                prompt_embeds, embeds = embeds[:num_prompts], embeds[num_prompts:]
            if len(embeds):
                negative_prompt_embeds = embeds
        dtype = self.unet.dtype

        def per_image(embeds):  # (N, T, D) -> (N * n, T, D), each prompt's copies side by side
            return embeds.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        prompt_embeds = per_image(prompt_embeds)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        return prompt_embeds, per_image(negative_prompt_embeds)

    def _encode_text(self, texts: list[str], max_length: int, device, clip_skip: int | None) -> torch.Tensor:
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        if any(len(ids) > max_length for ids in self.tokenizer(texts).input_ids):
            logger.warning(
                f"a prompt is longer than the text encoder's {max_length} tokens and was truncated"
            )
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        ids = tokens.input_ids.to(device)
        if clip_skip is None:
            return self.text_encoder(ids, attention_mask=mask)[0]
        hidden = self.text_encoder(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        # transformers >= 5 flattened CLIPTextModel (no .text_model), which breaks diffusers' clip_skip.
        final_norm = getattr(self.text_encoder, "text_model", self.text_encoder).final_layer_norm
        return final_norm(hidden[-(clip_skip + 1)])

    def prepare_latents(
        self, num_images, height, width, dtype, device, generator=None, latents=None
    ) -> torch.Tensor:
        """x_T ~ N(0, I) (Algorithm 2, line 1), scaled by the scheduler's init_noise_sigma."""
        f = self.vae_scale_factor
        shape = (num_images, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timesteps: torch.Tensor,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        timestep_cond: torch.Tensor | None = None,
        step_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        callback: Callable | None = None,
        callback_inputs=("latents",),
        progress: bool = True,
    ) -> torch.Tensor:
        """Algorithm 2, lines 2-5: x_t -> x_{t-1} for each t, guided when guidance_scale is given.

        context holds [unconditional; conditional] embeddings when guided, else the conditional ones.
        """
        step_kwargs = step_kwargs or {}
        scheduler, unet = self.scheduler, self.unet
        n = len(timesteps)
        with self.progress_bar(total=n) if progress else tqdm(total=n, disable=True) as bar:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents, latents]) if guidance_scale is not None else latents
                x = scheduler.scale_model_input(x, t)
                eps = unet(
                    x,
                    t,
                    encoder_hidden_states=context,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if guidance_scale is not None:
                    eps_uncond, eps_cond = eps.chunk(2)
                    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # CFG, eq. 6
                    if guidance_rescale > 0:
                        eps = rescale_guidance(eps, eps_cond, guidance_rescale)
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
                if callback is not None:
                    named = {"latents": latents, "prompt_embeds": context}
                    out = callback(self, i, t, {k: named[k] for k in callback_inputs}) or {}
                    latents = out.get("latents", latents)
                    context = out.get("prompt_embeds", context)
                bar.update()
        return latents

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor, output_type: str = "pil", generator=None):
        """Latents -> images in [0, 1] as output_type asks ("latent" returns them undecoded)."""
        if output_type == "latent":
            return latents
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        images = self.vae.decode(latents, return_dict=False, generator=generator)[0]
        images = (images / 2 + 0.5).clamp(0, 1)  # the VAE's [-1, 1] -> [0, 1]
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (N, H, W, 3)
        return images if output_type == "np" else numpy_to_pil(images)

    # ---- LoRA: fusing that undoes exactly ----------------------------------------------------

    def fuse_lora(self, components=("unet", "text_encoder"), lora_scale: float = 1.0, **kwargs):
        """diffusers' ``fuse_lora`` (W += lora_scale * (alpha / r) B A in place: calls then skip the LoRA
        branch), keeping a copy of each weight it changes so that ``unfuse_lora`` restores it bit for
        bit. peft unfuses by subtracting the update, (W + ΔW) - ΔW, which rounds. The copies cost the
        memory of the adapted layers' weights until unfused."""
        originals = self.__dict__.setdefault("_weights_before_fuse", {})
        for layer in self._lora_layers(components):
            originals.setdefault(layer, layer.get_base_layer().weight.detach().clone())  # the first fuse's
        super().fuse_lora(components=list(components), lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components=("unet", "text_encoder"), **kwargs):
        super().unfuse_lora(components=list(components), **kwargs)
        originals = self.__dict__.get("_weights_before_fuse", {})
        for layer in self._lora_layers(components):
            if layer in originals and not layer.merged:
                layer.get_base_layer().weight.data.copy_(originals.pop(layer))

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self.__dict__.pop("_weights_before_fuse", None)  # a fused update stays in: nothing to undo

    def _lora_layers(self, components) -> list[BaseTunerLayer]:
        models = [model for model in (getattr(self, name, None) for name in components) if model is not None]
        return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]

    # ---- helpers -----------------------------------------------------------------------------

    def step_kwargs(self, generator, eta: float) -> dict:
        """The extra arguments this scheduler's step() takes: generator (DDPM, Euler...), eta (DDIM)."""
        accepts = _step_parameters(type(self.scheduler))
        kwargs = {}
        if "generator" in accepts:
            kwargs["generator"] = generator
        if "eta" in accepts:
            kwargs["eta"] = eta
        return kwargs

    def guidance_embedding(self, guidance_scale: float, num_images: int, like: torch.Tensor):
        """timestep_cond for a guidance-distilled U-Net (time_cond_proj_dim set), else None.

        Sinusoidal features of (w - 1) * 1000 (Meng et al. 2023, "On Distillation of Guided
        Diffusion Models"), as diffusers computes them.
        """
        dim = self.unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((num_images,), guidance_scale - 1.0) * 1000.0
        half = dim // 2
        freqs = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
        emb = w[:, None] * freqs[None, :]
        emb = torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))
        return emb.to(device=like.device, dtype=like.dtype)


def rescale_guidance(eps: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eqs. 15-16:
    rescale the guided prediction to the conditional one's standard deviation, mixed by phi."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * eps


@cache
def _step_parameters(scheduler_class) -> frozenset[str]:
    return frozenset(inspect.signature(scheduler_class.step).parameters)
