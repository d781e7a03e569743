"""Stable Diffusion XL text to image: the SD recipe with two text encoders and added conditioning.

What SDXL changes (Podell et al. 2023, sec. 2.1-2.2), each in one method of ``TextToImageXLPipeline``:

- ``encode_prompt``: both encoders' penultimate states, concatenated, and encoder 2's pooled
  embedding, for the prompt and for the unconditional half of classifier-free guidance (zeros when
  there is no negative prompt and the model's ``force_zeros_for_empty_prompt`` is set, as SDXL base's is);
- ``_added_cond_kwargs``: the pooled embedding and the six size/crop numbers ``add_time_ids``,
  ``{"text_embeds", "time_ids"}``, which the SD pipeline's ``denoise`` hands the U-Net beside the text
  states (and a step-end callback sees as "add_text_embeds" and "add_time_ids");
- ``check_inputs``: the SD groups of ``inputs.py``, then SDXL's (second prompt, pooled embeddings,
  size conditioning); ``clip_skip`` counts from the penultimate layer;
- loading and saving: diffusers' SDXL folder (``sdlite.models_xl``) and the SGM single file
  (``single_file_xl``); a float16 VAE whose config sets ``force_upcast`` decodes in float32.

Everything else (the call state and step-end callback contract, latents, scheduler steps, guidance
and its rescale, non-finite checks, IP-Adapter embeddings, decoding, the LoRA check and the fuse that
undoes exactly) is ``TextToImagePipeline``'s. Conventions follow diffusers'
``StableDiffusionXLPipeline``, so the same weights, scheduler and generator give the same images.
Its invisible watermark is not applied, and one difference is deliberate: with several prompts and
negative_original_size/negative_target_size, diffusers repeats the [negative; positive] time ids as
[neg, pos, neg, pos] against embeddings ordered [neg, neg, pos, pos]; here each image's halves get
their own.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import StableDiffusionXLLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipelines import inputs
from pipelines.adapters import ExactLoraFuse, is_lycoris_source
from pipelines.sampling import guidance_embedding
from pipelines.single_file_xl import load_single_file_xl, save_single_file_xl
from pipelines.text_to_image import TextToImagePipeline
from sdlite.conditioning_xl import add_time_ids, encode_prompts_xl
from sdlite.ddpm import DDPMScheduler
from sdlite.lora import adapter_scale
from sdlite.models_xl import ComponentsXL, check_folder_xl, save_components_xl, tokenizers_xl
from sdlite.presets import SIZE_CONDITIONS

ENCODERS = ("text_encoder", "text_encoder_2")


class TextToImageXLPipeline(StableDiffusionXLLoraLoaderMixin, TextToImagePipeline):
    """pipe(prompt) -> ImagePipelineOutput(images) for SDXL; arguments as diffusers' SDXL pipeline.

    The SD pipeline's stages run here unchanged: its checks (``check_inputs`` runs the SD groups, then
    SDXL's), ``set_schedule``, ``prepare_latents``, ``denoise`` (given the added conditioning; a
    step-end callback may also read and replace "add_text_embeds" and "add_time_ids"), IP-Adapter
    embeddings, ``decode_latents``, FreeU and fused QKV, the LoRA check and the exact unfuse.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2",
                            "image_encoder", "feature_extractor"]  # fmt: skip
    _callback_tensor_inputs = ["latents", "prompt_embeds", "add_text_embeds", "add_time_ids"]
    _callback_added_cond = {"add_text_embeds": "text_embeds", "add_time_ids": "time_ids"}
    _lora_parts = ("unet", *ENCODERS)
    _lora_family = "SDXL"
    _denoising_end = None
    # diffusers' SDXL LoRA mixin comes first in the MRO: this keeps sdlite's reading of LoRA files
    # (kohya's per-module alphas, pickles refused), which goes on to diffusers' for other files.
    lora_state_dict = ExactLoraFuse.__dict__["lora_state_dict"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        image_encoder=None,
        feature_extractor=None,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        if add_watermarker:
            raise ValueError("sdlite does not watermark images: pass add_watermarker=False or leave it out")
        DiffusionPipeline.__init__(self)  # not the SD base's: it registers SD's five parts
        self.register_modules(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )  # fmt: skip
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)

    denoising_end = property(lambda self: self._denoising_end)

    # ---- the recipe --------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
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
        clip_skip: int | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        progress: bool = True,
    ):
        """Generate images; the arguments are those of diffusers' ``StableDiffusionXLPipeline``.

        prompt_2 / negative_prompt_2: what text encoder 2 reads (the same as encoder 1 when None).
        original_size, crops_coords_top_left, target_size: SDXL's size/crop conditioning, (height,
            width), (top, left), (height, width) in pixels; sizes default to the requested one. The
            negative_* ones condition the unconditional half (the same as the prompt's when None).
        denoising_end: stop after this fraction of the schedule (an ensemble-of-experts base model).
        The rest is as in ``TextToImagePipeline.__call__``.
        """
        return self._generate({name: value for name, value in locals().items() if name != "self"})

    def _generate(self, call: dict):
        """The SDXL recipe behind ``__call__``, over the call's arguments by name; the SD pipeline's
        ``prepare_inputs`` and ``start`` hooks let image to image and inpainting share it."""
        c = SimpleNamespace(**call)
        if isinstance(c.callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            c.callback_on_step_end_tensor_inputs = c.callback_on_step_end.tensor_inputs
        self.prepare_inputs(c)
        num_images = self.check_inputs(vars(c)) * c.num_images_per_prompt
        device = self._execution_device
        self._guidance_scale, self._guidance_rescale = c.guidance_scale, c.guidance_rescale
        self._clip_skip, self._cross_attention_kwargs = c.clip_skip, c.cross_attention_kwargs
        self._denoising_end = c.denoising_end
        guided = self.do_classifier_free_guidance
        cross_attention_kwargs = dict(c.cross_attention_kwargs or {})
        lora_scale = cross_attention_kwargs.pop("scale", None)  # for the text encoders too

        with torch.inference_mode(), adapter_scale(self.unet, *self._encoders(), scale=lora_scale):
            embeds, negative, pooled, negative_pooled = self.encode_prompt(
                c.prompt, c.prompt_2, device, c.num_images_per_prompt, guided, c.negative_prompt,
                c.negative_prompt_2, c.prompt_embeds, c.negative_prompt_embeds, c.pooled_prompt_embeds,
                c.negative_pooled_prompt_embeds, clip_skip=c.clip_skip,
            )  # fmt: skip
            cond, context = self._added_cond_kwargs(pooled, self.time_ids(c)), embeds
            if guided:  # one batch for both passes: the unconditional half first
                uncond = self._added_cond_kwargs(negative_pooled, self.time_ids(c, negative=True))
                context = torch.cat([negative, embeds])
                cond = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            if c.ip_adapter_image is not None or c.ip_adapter_image_embeds is not None:
                cond["image_embeds"] = self.prepare_ip_adapter_image_embeds(
                    c.ip_adapter_image, c.ip_adapter_image_embeds, device, num_images, guided
                )
            self.set_schedule(c.num_inference_steps, c.timesteps, c.sigmas, device)
            if hasattr(self.scheduler, "set_begin_index"):  # as diffusers' SDXL: start at the first step
                self.scheduler.set_begin_index(0)
            start = self.start(c, num_images, embeds.dtype, device)
            w_embedding = guidance_embedding(self.unet.config, c.guidance_scale, num_images, start.latents)
            latents = self.denoise(
                start.latents, context, self._truncated(start.timesteps),
                guidance_scale=c.guidance_scale if guided else None, guidance_rescale=c.guidance_rescale,
                guidance_interval=c.guidance_interval,
                timestep_cond=w_embedding, step_kwargs=self.step_kwargs(c.generator, c.eta),
                cross_attention_kwargs=cross_attention_kwargs or None, added_cond_kwargs=cond,
                callback=c.callback_on_step_end, callback_inputs=c.callback_on_step_end_tensor_inputs,
                progress=c.progress, step_inputs=start.step_inputs, unet_reads=start.unet_reads,
                after_step=start.after_step,
            )  # fmt: skip
            with self._vae_upcast():
                images = self.decode_latents(latents, c.output_type, c.generator)
        if isinstance(images, torch.Tensor):
            images = images.clone()  # a normal tensor: callers may change it in place
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if c.return_dict else (images,)

    # ---- stages SDXL changes -----------------------------------------------------------------

    def check_inputs(self, args: dict) -> int:
        """The SD pipeline's groups, then SDXL's (``inputs.check_prompts_xl``,
        ``inputs.check_size_conditioning``); returns the number of prompts."""
        num_prompts = super().check_inputs(args)
        inputs.check_prompts_xl(args, num_prompts)
        inputs.check_size_conditioning(args)
        self.check_time_ids()
        return num_prompts

    num_time_ids = SIZE_CONDITIONS  # what time_ids makes: original size, crop, target size

    def check_time_ids(self) -> None:
        """The U-Net's added embedding reads as many time ids as ``time_ids`` makes: a refiner's reads
        five (size, crop, aesthetic score), which only the image pipelines make."""
        unet, encoder = self.unet.config, self.text_encoder_2
        if unet.get("addition_embed_type") != "text_time" or encoder is None:
            return
        reads = (
            unet.projection_class_embeddings_input_dim - encoder.config.projection_dim
        ) / unet.addition_time_embed_dim
        if reads == self.num_time_ids:
            return
        refiner, base = SIZE_CONDITIONS - 1, SIZE_CONDITIONS
        fixes = {
            refiner: "a refiner's (size, crop and aesthetic score): draw with ImageToImageXLPipeline or "
            "InpaintXLPipeline and requires_aesthetics_score=True",
            base: "a base model's (sizes and crop): requires_aesthetics_score=True is for a refiner's U-Net; "
            "leave it False",
        }
        fix = fixes.get(reads, "the U-Net and text_encoder_2 come from different models")
        raise ValueError(
            f"the U-Net's added embedding reads {reads:g} time ids but {type(self).__name__} makes "
            f"{self.num_time_ids}: {fix}"
        )

    def clip_skip_limit(self) -> int | None:
        """SDXL reads the penultimate layer already, so clip_skip counts from there."""
        layers = [m.config.num_hidden_layers - 1 for m in self._encoders()]
        return min(layers) if layers else None

    @torch.no_grad()  # inference mode when called from __call__
    def encode_prompt(
        self,
        prompt,
        prompt_2=None,
        device=None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt=None,
        negative_prompt_2=None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ):
        """(prompt_embeds, negative_prompt_embeds, pooled, negative_pooled), each repeated per image:
        (N n, T, d1 + d2) states and (N n, p) pooled. The negative side is None without guidance;
        with guidance and no negative prompt it is zeros (force_zeros_for_empty_prompt) or the
        empty prompt's. Prompt and negative prompt go through the encoders in one batch."""
        device = device or self._execution_device
        as_list = lambda p: [p] if isinstance(p, str) else list(p)  # noqa: E731
        num_prompts = len(prompt_embeds) if prompt_embeds is not None else len(as_list(prompt))
        texts, texts_2 = [], []
        if prompt_embeds is None:
            texts, texts_2 = as_list(prompt), as_list(prompt_2 or prompt)
        zeros = negative_prompt is None and self.config.force_zeros_for_empty_prompt
        encode_negative = do_classifier_free_guidance and negative_prompt_embeds is None and not zeros
        if encode_negative:
            negative_prompt = negative_prompt or ""
            negative_prompt_2 = negative_prompt_2 or negative_prompt
            texts += as_list(negative_prompt) * (num_prompts if isinstance(negative_prompt, str) else 1)
            texts_2 += as_list(negative_prompt_2) * (num_prompts if isinstance(negative_prompt_2, str) else 1)
        if texts:  # a textual-inversion word of n vectors is n tokens (a refiner has no first tokenizer)
            if self.tokenizer is not None:
                texts = self.maybe_convert_prompt(texts, self.tokenizer)
            texts_2 = self.maybe_convert_prompt(texts_2, self.tokenizer_2)
            with adapter_scale(*self._encoders(), scale=lora_scale):
                embeds, pooled = encode_prompts_xl(
                    self.text_encoder, self.text_encoder_2, self.tokenizer, self.tokenizer_2, texts, texts_2,
                    clip_skip=clip_skip,
                )  # fmt: skip
            if prompt_embeds is None:
                prompt_embeds, pooled_prompt_embeds = embeds[:num_prompts], pooled[:num_prompts]
            if encode_negative:
                negative_prompt_embeds, negative_pooled_prompt_embeds = (
                    embeds[-num_prompts:],
                    pooled[-num_prompts:],
                )
        if do_classifier_free_guidance and negative_prompt_embeds is None:  # zeros, as SDXL base was trained
            negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
        encoder = self.text_encoder_2 if self.text_encoder_2 is not None else self.unet
        dtype = encoder.dtype

        def per_image(x):  # (N, ...) -> (N n, ...), each prompt's copies side by side
            return x.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)

        out = [per_image(prompt_embeds), None, per_image(pooled_prompt_embeds), None]
        if do_classifier_free_guidance:
            out[1], out[3] = per_image(negative_prompt_embeds), per_image(negative_pooled_prompt_embeds)
        return tuple(out)

    def time_ids(self, c: SimpleNamespace, negative: bool = False) -> torch.Tensor:
        """SDXL's six size/crop numbers for the prompt's half, or (negative) the unconditional half's:
        the negative_* ones when both sizes are given, else the prompt's, as diffusers does."""
        size = (c.height, c.width)
        sizes = (c.original_size or size, c.crops_coords_top_left, c.target_size or size)
        if negative and c.negative_original_size is not None and c.negative_target_size is not None:
            sizes = (c.negative_original_size, c.negative_crops_coords_top_left, c.negative_target_size)
        return add_time_ids(*(tuple(s) for s in sizes))

    def _added_cond_kwargs(self, pooled, time_ids: torch.Tensor) -> dict:
        """The U-Net's added conditioning: {"text_embeds": (B, p) pooled, "time_ids": (B, k)}."""
        ids = time_ids.to(device=pooled.device, dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": ids.repeat(len(pooled), 1)}

    # ---- helpers -----------------------------------------------------------------------------

    def _encoders(self) -> list:
        return [m for m in (getattr(self, n, None) for n in ENCODERS) if m is not None]

    def _truncated(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timesteps t >= (1 - denoising_end) T: the base model's share of an ensemble of experts."""
        end = self._denoising_end
        if not (isinstance(end, float) and 0 < end < 1):
            return timesteps
        steps = self.scheduler.config.num_train_timesteps
        return timesteps[timesteps >= int(round(steps - end * steps))]

    @contextmanager
    def _vae_upcast(self):
        """Decode in float32 when a float16 VAE's config asks (SDXL's VAE overflows in half precision)."""
        upcast = self.vae.dtype == torch.float16 and getattr(self.vae.config, "force_upcast", False)
        if upcast:
            with torch.inference_mode(False):  # weights stay normal tensors, trainable afterwards
                self.vae.to(torch.float32)
        try:
            yield
        finally:
            if upcast:
                with torch.inference_mode(False):
                    self.vae.to(torch.float16)

    # ---- LoRA ----------------------------------------------------------------------------------

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name=None, **kwargs):
        """diffusers' SDXL ``load_lora_weights`` (keys ``unet.``, ``text_encoder.``, ``text_encoder_2.``,
        or kohya's) after ``check_lora``: an SD 1.x LoRA fails naming what it was made for, with
        nothing loaded. ``fuse_lora`` / ``unfuse_lora`` cover all three models and undo exactly."""
        if is_lycoris_source(pretrained_model_name_or_path_or_dict):  # LoHa, LoKr, DoRA: merged exactly
            return self.load_lycoris(pretrained_model_name_or_path_or_dict, **kwargs)
        kwargs.setdefault("local_files_only", True)
        self.check_lora(pretrained_model_name_or_path_or_dict, **kwargs)
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)

    # ---- loading and saving ------------------------------------------------------------------

    # from_pretrained is the SD pipeline's (local files only, a saved diffusers DDPMScheduler loads as
    # sdlite's, pickles only when they hold tensors alone) over these two:

    @classmethod
    def _check_folder(cls, path, kwargs: dict) -> Path:
        """An SDXL folder (``check_folder_xl``): an SD 1.x or a mixed one fails naming its parts."""
        return check_folder_xl(path, weights=kwargs.get("variant") is None, pickled=True)

    @classmethod
    def _default_tokenizers(cls, path: Path, kwargs: dict) -> dict:
        """The folder's tokenizers, or CLIP's built offline; a refiner (no text_encoder/) gets only
        tokenizer_2, its model_index.json leaving the first one None."""
        if {"tokenizer", "tokenizer_2"} <= kwargs.keys():
            return {}
        first = (path / "text_encoder").is_dir()
        encoder = path / ("text_encoder" if first else "text_encoder_2")
        length = CLIPTextModel.config_class.from_pretrained(encoder).max_position_embeddings
        tokenizers = dict(zip(("tokenizer", "tokenizer_2"), tokenizers_xl(path, length)))
        return tokenizers if first else {"tokenizer_2": tokenizers["tokenizer_2"]}

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> Path:
        """Write diffusers' SDXL layout (``save_components_xl``), which loads here and in diffusers'
        ``StableDiffusionXLPipeline``. Variants, pickled weights or missing optional parts take
        diffusers' own writer; either way model_index.json names diffusers' classes only."""
        path = Path(save_directory)
        parts = {name: getattr(self, name, None) for name in ComponentsXL.__dataclass_fields__}
        if kwargs or not safe_serialization or any(p is None for p in parts.values()):
            DiffusionPipeline.save_pretrained(self, path, safe_serialization=safe_serialization, **kwargs)
        else:
            save_components_xl(ComponentsXL(**parts), path)
        index = json.loads((path / "model_index.json").read_text())
        index["_class_name"] = "StableDiffusionXLPipeline"
        if isinstance(self.scheduler, DDPMScheduler):  # same config keys as diffusers' DDPMScheduler
            index["scheduler"] = ["diffusers", "DDPMScheduler"]
        index["force_zeros_for_empty_prompt"] = bool(self.config.force_zeros_for_empty_prompt)
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        return path

    @classmethod
    def from_single_file(
        cls, path, config="sdxl", torch_dtype: torch.dtype | None = None
    ) -> TextToImageXLPipeline:
        """Load an SDXL single-file ``.safetensors`` checkpoint (Stability's SGM layout, as A1111 and
        ComfyUI use); ``config`` (an SDXL preset name or an SDXL folder) gives the architecture."""
        return cls(**load_single_file_xl(path, config, torch_dtype).as_dict())

    def save_single_file(self, path, dtype: torch.dtype | None = None) -> Path:
        """Write the U-Net, VAE and both text encoders as one SGM-layout ``.safetensors`` checkpoint."""
        return save_single_file_xl(self.unet, self.vae, self.text_encoder, self.text_encoder_2, path, dtype)
