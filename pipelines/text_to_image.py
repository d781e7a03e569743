"""Text to image: prompt -> CLIP embeddings -> x_T ~ N(0, I) -> denoise with a scheduler -> VAE decode.

The reverse process is Ho et al. 2020's Algorithm 2 run by whichever scheduler the pipeline holds
(sdlite's DDPM by default, or any diffusers scheduler), steered by classifier-free guidance
(Ho & Salimans 2022, eq. 6): ε̃ = ε(x_t, ∅) + w (ε(x_t, c) - ε(x_t, ∅)), off when w <= 1.

Conventions follow diffusers' ``StableDiffusionPipeline`` so that the same weights, scheduler and
generator give the same images, and code written for it runs here: the unconditional half comes
first in the batch, the empty prompt stands in for a missing negative prompt, x_T is drawn with
``randn_tensor`` and scaled by the scheduler's ``init_noise_sigma``, latents go through
``sdlite.latents.decode``; a step-end callback may read and replace ``_callback_tensor_inputs``,
change ``pipe._guidance_scale`` (re-read every step) and set ``pipe._interrupt`` to stop early.

LoRA adapters load through diffusers' ``StableDiffusionLoraLoaderMixin`` (``load_lora_weights``,
``set_adapters``, ``fuse_lora``...); ``cross_attention_kwargs={"scale": s}`` multiplies every active
adapter's update, in the U-Net and the text encoder, by s for one call. IP-Adapters load through
``IPAdapterMixin`` (``load_ip_adapter``) and take ``ip_adapter_image`` or ``ip_adapter_image_embeds``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.utils import logging
from diffusers.utils.pil_utils import numpy_to_pil
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from pipelines import inputs
from pipelines.adapters import Embeddings, ExactLoraFuse, ImagePrompts, is_lycoris_source
from pipelines.base import BasePipeline
from pipelines.lora_check import check_lora_fits
from pipelines.sampling import (
    SamplingState,
    Start,
    conditional_half,
    guidance_embedding,
    in_interval,
    rescale_guidance,
)
from sdlite import latents as latent_codec
from sdlite.lora import adapter_scale

logger = logging.get_logger(__name__)


class TextToImagePipeline(
    ExactLoraFuse, Embeddings, ImagePrompts, SamplingState, BasePipeline, StableDiffusionLoraLoaderMixin,
    IPAdapterMixin,
):  # fmt: skip
    """pipe(prompt) -> StableDiffusionPipelineOutput(images, nsfw_content_detected), stage by stage.

    ``__call__`` is the recipe; each stage is a method named for its job and usable on its own:
    ``check_inputs``, ``encode_prompt``, ``prepare_latents``, ``denoise``, ``decode_latents``.
    ``limits`` (``inputs.Limits``) bounds the images, pixels and steps of one call; None lifts it.
    """

    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    limits: inputs.Limits | None = inputs.Limits()

    # ---- the recipe --------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
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
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress: bool = True,
    ):
        """Generate images for ``prompt`` (or ``prompt_embeds``); arguments as diffusers' SD pipeline.

        timesteps / sigmas: a custom schedule instead of num_inference_steps (sigmas for schedulers
            whose set_timesteps takes them: Euler, DPM++, e.g. Align-Your-Steps).
        guidance_scale: w of classifier-free guidance; <= 1 turns it off (one U-Net pass per step).
        guidance_interval: (lo, hi): guide only the steps whose timestep t has lo <= t <= hi, the
            others take one conditional pass (Kynkäänniemi et al. 2024: guidance at high noise costs
            the samples' variety); None: every step.
        generator: a torch.Generator, or one per image, for exactly reproducible draws.
        output_type: "pil" (list of PIL images), "np" ((N, H, W, 3) in [0, 1]), "pt" ((N, 3, H, W)
            in [0, 1]) or "latent" (the denoised latents, before the VAE).
        cross_attention_kwargs: passed to the U-Net's attention processors, except "scale", the
            strength of the loaded LoRA adapters for this call (0: the base model, 1: as loaded).
        clip_skip: use the text encoder's output this many layers before the last.
        callback_on_step_end: f(pipe, step, t, {name: tensor}) called after each step with the tensors
            named in callback_on_step_end_tensor_inputs (of ``_callback_tensor_inputs``); a dict it
            returns replaces them.
        progress: False hides the progress bar for this call.
        Returns StableDiffusionPipelineOutput(images, nsfw_content_detected), or that pair as a tuple
        when return_dict is False (nsfw_content_detected is None without a safety checker).
        """
        # Every argument, by name: the one place the call's signature is written (see check_inputs).
        return self._generate({name: value for name, value in locals().items() if name != "self"})

    def _generate(self, call: dict):
        """The recipe behind ``__call__``, over the call's arguments by name (``call``).

        A pipeline that starts elsewhere (image to image, inpainting) runs this recipe with its own
        ``prepare_inputs`` (sizes, images as tensors) and ``start`` (timesteps, first latents, and
        what ``denoise`` adds at each step); everything else is shared.
        """
        c = SimpleNamespace(**call)
        if isinstance(c.callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            c.callback_on_step_end_tensor_inputs = c.callback_on_step_end.tensor_inputs
        self.prepare_inputs(c)
        num_images = self.check_inputs(vars(c)) * c.num_images_per_prompt
        device = self._execution_device
        self._guidance_scale, self._guidance_rescale = c.guidance_scale, c.guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = c.clip_skip, c.cross_attention_kwargs
        guided = self.do_classifier_free_guidance
        cross_attention_kwargs = dict(c.cross_attention_kwargs or {})
        lora_scale = cross_attention_kwargs.pop("scale", None)  # for the text encoder too, not only the U-Net

        with torch.inference_mode(), adapter_scale(self.unet, self.text_encoder, scale=lora_scale):
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                c.prompt, device, c.num_images_per_prompt, guided, c.negative_prompt, c.prompt_embeds,
                c.negative_prompt_embeds, clip_skip=c.clip_skip,
            )  # fmt: skip
            # One batch for both passes, built once: (2N, T, D) with the unconditional half first.
            context = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
            added_cond = None
            if c.ip_adapter_image is not None or c.ip_adapter_image_embeds is not None:
                image_embeds = self.prepare_ip_adapter_image_embeds(
                    c.ip_adapter_image, c.ip_adapter_image_embeds, device, num_images, guided
                )
                added_cond = {"image_embeds": image_embeds}
            self.set_schedule(c.num_inference_steps, c.timesteps, c.sigmas, device)
            start = self.start(c, num_images, context.dtype, device)
            w_embedding = guidance_embedding(self.unet.config, c.guidance_scale, num_images, start.latents)
            latents = self.denoise(
                start.latents, context, start.timesteps, guidance_scale=c.guidance_scale if guided else None,
                guidance_rescale=c.guidance_rescale, guidance_interval=c.guidance_interval,
                timestep_cond=w_embedding, step_kwargs=self.step_kwargs(c.generator, c.eta),
                cross_attention_kwargs=cross_attention_kwargs or None, added_cond_kwargs=added_cond,
                callback=c.callback_on_step_end, callback_inputs=c.callback_on_step_end_tensor_inputs,
                progress=c.progress, step_inputs=start.step_inputs, unet_reads=start.unet_reads,
                after_step=start.after_step,
            )  # fmt: skip
            images, nsfw = self.decode_latents(latents, c.output_type, c.generator, with_safety_flags=True)
        if isinstance(images, torch.Tensor):
            images = images.clone()  # a normal tensor: callers may change it in place
        self.maybe_free_model_hooks()
        if not c.return_dict:
            return images, nsfw
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=nsfw)

    # ---- LoRA: checked against the model before any weight changes ----------------------------

    _lora_parts = ("unet", "text_encoder")  # the models a LoRA of this pipeline's family adapts
    _lora_family = "SD 1.x/2.x"

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' ``load_lora_weights`` after ``check_lora``: a LoRA of another family (SDXL's)
        fails naming what it was made for, with nothing loaded."""
        if is_lycoris_source(pretrained_model_name_or_path_or_dict):  # LoHa, LoKr, DoRA: merged exactly
            return self.load_lycoris(pretrained_model_name_or_path_or_dict, **kwargs)
        kwargs.setdefault("local_files_only", True)
        self.check_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    def check_lora(self, pretrained_model_name_or_path_or_dict, **kwargs) -> None:
        """Raise ValueError unless every layer the LoRA adapts exists here with the LoRA's widths
        (``lora_check.check_lora_fits``); the file is read as ``lora_state_dict`` reads it."""
        state = pretrained_model_name_or_path_or_dict
        if not isinstance(state, dict):
            state = self.lora_state_dict(state, unet_config=self.unet.config, **kwargs)[0]
        models = {name: getattr(self, name, None) for name in self._lora_parts}
        check_lora_fits(state, models, self._lora_family)

    # ---- stages ------------------------------------------------------------------------------

    def check_inputs(self, args: dict) -> int:
        """Fail before any work with a ValueError naming the argument and what it allows.

        ``args`` is the call's arguments by name (height and width resolved); returns the number of
        prompts. The checks live in ``pipelines/inputs.py``, one group per subject: a pipeline with
        more arguments calls this and adds its own groups.
        """
        unet, f = self.unet.config, self.vae_scale_factor
        num_prompts = inputs.check_prompts(
            args["prompt"], args["prompt_embeds"], args["negative_prompt"], args["negative_prompt_embeds"],
            embed_width=unet.cross_attention_dim,
        )  # fmt: skip
        height, width = args["height"], args["width"]
        per_prompt = args["num_images_per_prompt"]
        num_images = inputs.check_batch(num_prompts, per_prompt, height, width, f, self.limits)
        inputs.check_schedule(
            args["num_inference_steps"], args["timesteps"], args["sigmas"], self.limits,
            num_train_timesteps=self.scheduler.config.get("num_train_timesteps"),
        )  # fmt: skip
        inputs.check_guidance(
            args["guidance_scale"], args["eta"], args["guidance_rescale"], args["clip_skip"],
            text_layers=self.clip_skip_limit(), interval=args["guidance_interval"],
        )  # fmt: skip
        if not self._encoders() and (args["prompt"] is not None or args["negative_prompt"] is not None):
            raise ValueError(
                "prompt needs a text encoder and this pipeline has none: pass prompt_embeds "
                "(and negative_prompt_embeds)"
            )
        self.check_unet_inputs()
        shape = (num_images, self.num_channels_latents, height // f, width // f)
        inputs.check_noise(args["generator"], args["latents"], num_images, shape)
        inputs.check_output(
            args["output_type"], args["callback_on_step_end_tensor_inputs"], self._callback_tensor_inputs
        )
        inputs.check_ip_adapter(
            args["ip_adapter_image"], args["ip_adapter_image_embeds"], self.num_ip_adapters,
            has_image_encoder=getattr(self, "image_encoder", None) is not None,
        )  # fmt: skip
        return num_prompts

    def check_unet_inputs(self) -> None:
        """The U-Net reads x_t alone, as many channels as the VAE's latents; an inpainting U-Net (2 C + 1:
        x_t, the mask, the masked image) fails naming the pipeline it runs in."""
        latent = getattr(getattr(self, "vae", None), "config", {}).get("latent_channels")
        reads = self.unet.config.in_channels
        if latent is not None and reads != latent:
            why = (
                "an inpainting model: use InpaintPipeline" if reads == 2 * latent + 1 else "different models"
            )
            raise ValueError(f"the U-Net reads {reads} input channels and the VAE makes {latent}: {why}")

    def _encoders(self) -> list:
        """The text encoders held (none in a pipeline built for prompt_embeds alone)."""
        return [self.text_encoder] if self.text_encoder is not None else []

    @property
    def num_channels_latents(self) -> int:
        """Channels of x_t: the U-Net's input channels (an inpainting U-Net reads more than x_t)."""
        return self.unet.config.in_channels

    def clip_skip_limit(self) -> int | None:
        """clip_skip must be below this: the text encoder's layers (None without one)."""
        return self.text_encoder.config.num_hidden_layers if self.text_encoder is not None else None

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
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (N * num_images_per_prompt, T, D).

        Prompt and negative prompt go through the text encoder in one batch (its LoRA adapters at
        ``lora_scale``). The negative side is None without guidance; with guidance and no negative
        prompt it is the empty prompt's. Needs only the tokenizer and text encoder.
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
            with adapter_scale(self.text_encoder, scale=lora_scale):
                embeds = self._encode_text(texts, max_length, device, clip_skip)
            if prompt_embeds is None:
                prompt_embeds, embeds = embeds[:num_prompts], embeds[num_prompts:]
            if len(embeds):
                negative_prompt_embeds = embeds
        encoder = self.text_encoder if self.text_encoder is not None else self.unet
        dtype = encoder.dtype if encoder is not None else prompt_embeds.dtype
        # (N, T, D) -> (N * n, T, D), each prompt's copies side by side
        n = num_images_per_prompt
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)
        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(n, dim=0)
        else:
            negative_prompt_embeds = None
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(self, texts: list[str], max_length: int, device, clip_skip: int | None) -> torch.Tensor:
        texts = self.maybe_convert_prompt(texts, self.tokenizer)  # a textual-inversion word's n tokens
        tokens = self.tokenizer(
            texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
        )
        for ids in self.tokenizer(texts).input_ids:
            if len(ids) > max_length:  # kept: BOS, the first max_length - 2 tokens, EOS
                cut = self.tokenizer.decode(ids[max_length - 1 : -1])
                logger.warning(f"the text encoder reads {max_length} tokens; cut off: {cut}")
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

    def prepare_inputs(self, c: SimpleNamespace) -> None:
        """Fill in what the call left to the pipeline: height and width default to the U-Net's size."""
        c.height, c.width = self.resolve_size(c.height, c.width)

    def start(self, c: SimpleNamespace, num_images: int, dtype, device) -> Start:
        """Where the reverse process starts: every timestep of the schedule, from x_T ~ N(0, I)."""
        latents = self.prepare_latents(num_images, c.height, c.width, dtype, device, c.generator, c.latents)
        return Start(self.scheduler.timesteps, latents)

    def prepare_latents(
        self, num_images, height, width, dtype, device, generator=None, latents=None
    ) -> torch.Tensor:
        """x_T ~ N(0, I) (Algorithm 2, line 1), scaled by the scheduler's init_noise_sigma."""
        f = self.vae_scale_factor
        shape = (num_images, self.num_channels_latents, height // f, width // f)
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
        guidance_interval: tuple[float, float] | None = None,
        timestep_cond: torch.Tensor | None = None,
        step_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        added_cond_kwargs: dict | None = None,
        callback: Callable | None = None,
        callback_inputs=("latents",),
        progress: bool = True,
        step_inputs: dict[str, torch.Tensor] | None = None,
        unet_reads: tuple[str, ...] = (),
        after_step: Callable[[int, torch.Tensor, dict], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Algorithm 2, lines 2-5: x_t -> x_{t-1} for each t, guided when guidance_scale is given.

        context holds [unconditional; conditional] embeddings when guided, else the conditional ones;
        a step outside ``guidance_interval`` takes the conditional halves alone.
        w is re-read from ``self._guidance_scale`` every step, where a callback may change it; a
        callback that sets ``self._interrupt`` ends the loop after its step. Raises NonFiniteSampleError
        naming the cause when the latents stop being finite.
        step_inputs, unet_reads, after_step: as ``Start``'s. The step inputs are doubled for guidance
        as the latents are, [unconditional; conditional], so that a callback sees (and may replace)
        them in diffusers' shapes; after_step(i, x_{t-1}, step_inputs) runs before the callback.
        """
        step_kwargs = step_kwargs or {}
        doubled = guidance_scale is not None
        step_inputs = {k: torch.cat([x, x]) if doubled else x for k, x in (step_inputs or {}).items()}
        scheduler, unet = self.scheduler, self.unet
        if guidance_scale is not None:
            self._guidance_scale = guidance_scale
        self._num_timesteps, self._interrupt = len(timesteps), False
        n = len(timesteps)
        with self.progress_bar(total=n) if progress else tqdm(total=n, disable=True) as bar:
            for i, t in enumerate(timesteps):
                if self._interrupt:
                    break
                guide = guidance_scale is not None and in_interval(t, guidance_interval)
                x = torch.cat([latents, latents]) if guide else latents
                x = scheduler.scale_model_input(x, t)
                skip = guidance_scale is not None and not guide
                if unet_reads:  # after the scaling: they are not the noisy sample
                    channels = torch.cat([step_inputs[name] for name in unet_reads], dim=1)
                    x = torch.cat([x, conditional_half(channels) if skip else channels], dim=1)
                out = unet(
                    x,
                    t,
                    encoder_hidden_states=conditional_half(context) if skip else context,
                    timestep_cond=timestep_cond,
                    cross_attention_kwargs=cross_attention_kwargs,
                    added_cond_kwargs=conditional_half(added_cond_kwargs) if skip else added_cond_kwargs,
                    return_dict=False,
                )[0]
                eps = out
                if guide:
                    eps_uncond, eps_cond = out.chunk(2)
                    eps = eps_uncond + self._guidance_scale * (eps_cond - eps_uncond)  # CFG, eq. 6
                    if guidance_rescale > 0:
                        eps = rescale_guidance(eps, eps_cond, guidance_rescale)
                before = latents
                latents = scheduler.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
                self.check_finite(latents, i, t, before, out, eps)
                if after_step is not None:
                    latents = after_step(i, latents, step_inputs)
                if callback is not None:
                    latents, context, added_cond_kwargs, step_inputs = self.run_callback(
                        callback, callback_inputs, i, t, latents, context, added_cond_kwargs, step_inputs
                    )
                bar.update()
        return latents

    @torch.no_grad()
    def decode_latents(
        self, latents: torch.Tensor, output_type: str = "pil", generator=None, with_safety_flags: bool = False
    ):
        """Latents -> images in [0, 1] as output_type asks ("latent" returns them undecoded).

        A safety checker, when the pipeline has one, blacks out the images it flags; with
        ``with_safety_flags`` the result is (images, flags), flags None without a checker.
        """
        nsfw = None
        if output_type == "latent":
            images = latents
        else:
            images = latent_codec.decode(self.vae, latents, generator)
            images = (images / 2 + 0.5).clamp(0, 1)  # the VAE's [-1, 1] -> [0, 1]
            images, nsfw = self.run_safety_checker(images)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()  # (N, H, W, 3)
                images = images if output_type == "np" else numpy_to_pil(images)
        return (images, nsfw) if with_safety_flags else images
