"""The arguments of a text-to-image call, checked before any work is done, one group per subject.

Each bad argument raises a ValueError that names it and says what it allows, so a typo costs an
error message rather than a minute of denoising or a shape error deep inside the U-Net. A pipeline's
``check_inputs(args)`` runs the groups over its call's arguments; a pipeline with more arguments
(SDXL's second prompt, its size conditioning) runs these and adds its own groups.

``Limits`` bounds what one call may ask for (images, pixels, steps), so that a stray
``num_images_per_prompt=10**5`` or ``height=10**6`` fails at once instead of filling the memory.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from sdlite.tokenizer import check_text

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
LIMITS_HELP = (
    "raise it with pipe.limits = Limits({name}=...) (from pipelines), or lift every limit with "
    "pipe.limits = None"
)


@dataclass(frozen=True)
class Limits:
    """The most one call may ask for; ``pipe.limits`` holds them (None lifts them all).

    The defaults leave room for every ordinary use (SD 1.5 makes 512x512 images; SDXL 1024x1024)
    and stop arguments that would run for hours or exhaust the memory before any image appears.
    """

    max_images: int = 256  # images per call: prompts x num_images_per_prompt
    max_side: int = 8192  # pixels along height or width
    max_pixels: int = 2**28  # images x height x width per call (256 images of 1024x1024)
    max_steps: int = 1000  # num_inference_steps, or the length of timesteps / sigmas


def check_prompts(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds, embed_width: int) -> int:
    """One of prompt / prompt_embeds, at most one negative; returns the number of prompts."""
    if (prompt is None) == (prompt_embeds is None):
        got = "both" if prompt is not None else "neither"
        raise ValueError(f"pass exactly one of prompt or prompt_embeds, got {got}")
    if prompt is not None:
        if not _is_text(prompt):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {_describe(prompt)}")
        check_encodable("prompt", prompt)
        num_prompts = 1 if isinstance(prompt, str) else len(prompt)
    else:
        if not (
            isinstance(prompt_embeds, torch.Tensor)
            and prompt_embeds.ndim == 3
            and prompt_embeds.shape[-1] == embed_width
        ):
            raise ValueError(
                f"prompt_embeds must be a tensor of shape (batch, tokens, {embed_width}), "
                f"got {_describe(prompt_embeds)}"
            )
        num_prompts = len(prompt_embeds)
    if negative_prompt is not None and negative_prompt_embeds is not None:
        raise ValueError("pass at most one of negative_prompt or negative_prompt_embeds, got both")
    if negative_prompt is not None:
        if not _is_text(negative_prompt):
            raise ValueError(
                f"negative_prompt must be a str or a list of str, got {_describe(negative_prompt)}"
            )
        check_encodable("negative_prompt", negative_prompt)
        if isinstance(negative_prompt, list) and len(negative_prompt) != num_prompts:
            raise ValueError(
                f"negative_prompt has {len(negative_prompt)} entries but there are {num_prompts} "
                f"prompts: pass one str for all or a list of {num_prompts}"
            )
    if negative_prompt_embeds is not None:
        negative = negative_prompt_embeds
        like = prompt_embeds if prompt_embeds is not None else negative
        shape = (num_prompts, *like.shape[1:]) if isinstance(like, torch.Tensor) else None
        if not isinstance(negative, torch.Tensor) or negative.shape != shape:
            want = shape or "(batch, tokens, width)"
            raise ValueError(f"negative_prompt_embeds must have shape {want}, got {_describe(negative)}")
    return num_prompts


def check_batch(num_prompts, num_images_per_prompt, height, width, vae_factor: int, limits: Limits | None):
    """Image size (multiples of the VAE factor) and count, within ``limits``; returns the image count."""
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0 or value % vae_factor:
            raise ValueError(
                f"{name} must be a positive multiple of {vae_factor} (the VAE factor), got {value!r}"
            )
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    num_images = num_prompts * num_images_per_prompt
    if limits is None:
        return num_images
    for name, value in (("height", height), ("width", width)):
        if value > limits.max_side:
            raise ValueError(
                f"{name}={value} is more than pipe.limits.max_side={limits.max_side} pixels; "
                + LIMITS_HELP.format(name="max_side")
            )
    if num_images > limits.max_images:
        raise ValueError(
            f"num_images_per_prompt={num_images_per_prompt} makes {num_images} images in one call "
            f"({num_prompts} prompts x {num_images_per_prompt}), more than pipe.limits.max_images="
            f"{limits.max_images}: generate in several calls, or " + LIMITS_HELP.format(name="max_images")
        )
    if num_images * height * width > limits.max_pixels:
        raise ValueError(
            f"num_images_per_prompt={num_images_per_prompt} x height={height} x width={width} makes "
            f"{num_images * height * width} pixels in one call, more than pipe.limits.max_pixels="
            f"{limits.max_pixels}: generate fewer or smaller images per call, or "
            + LIMITS_HELP.format(name="max_pixels")
        )
    return num_images


def check_schedule(
    num_inference_steps, timesteps, sigmas, limits: Limits | None, num_train_timesteps: int | None = None
) -> None:
    """A step count, or one custom list of timesteps (each below the scheduler's ``num_train_timesteps``)
    or of sigmas, within ``limits``."""
    if timesteps is not None and sigmas is not None:
        raise ValueError("pass at most one of timesteps or sigmas, got both")
    if timesteps is None and sigmas is None:
        if not _is_int(num_inference_steps) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        name, steps = "num_inference_steps", num_inference_steps
    elif timesteps is not None:
        top = num_train_timesteps or math.inf
        if not (_is_list(timesteps) and all(_is_int(t) and 0 <= t < top for t in timesteps)):
            most = f" and < {top} (the scheduler's num_train_timesteps)" if top < math.inf else ""
            raise ValueError(
                f"timesteps must be a non-empty list of int >= 0{most}, got {_describe(timesteps)}"
            )
        name, steps = "timesteps", len(timesteps)
    else:
        if not (_is_list(sigmas) and all(_is_real(s, 0) for s in sigmas)):
            raise ValueError(f"sigmas must be a non-empty list of numbers >= 0, got {_describe(sigmas)}")
        name, steps = "sigmas", len(sigmas)
    if limits is not None and steps > limits.max_steps:
        raise ValueError(
            f"{name} asks for {steps} denoising steps, more than pipe.limits.max_steps={limits.max_steps}; "
            + LIMITS_HELP.format(name="max_steps")
        )


def check_guidance(
    guidance_scale, eta, guidance_rescale, clip_skip, text_layers: int | None, interval=None
) -> None:
    """Classifier-free guidance's w, φ and interval, DDIM's eta, and clip_skip below the text
    encoder's depth."""
    if interval is not None and not (
        isinstance(interval, (tuple, list))
        and len(interval) == 2
        and all(_is_real(v, 0, None) for v in interval)
        and interval[0] <= interval[1]
    ):
        raise ValueError(
            "guidance_interval must be None or (lo, hi) timesteps with 0 <= lo <= hi, "
            f"got {_describe(interval)}"
        )
    for name, value, low, high, allowed in (
        ("guidance_scale", guidance_scale, None, None, "a finite number"),
        ("eta", eta, 0, None, "a finite number >= 0"),
        ("guidance_rescale", guidance_rescale, 0, 1, "a number in [0, 1]"),
    ):
        if not _is_real(value, low, high):
            raise ValueError(f"{name} must be {allowed}, got {_describe(value)}")
    if clip_skip is not None and (
        not _is_int(clip_skip) or clip_skip < 0 or (text_layers is not None and clip_skip >= text_layers)
    ):
        most = f" and < {text_layers} (the text encoder's layers)" if text_layers is not None else ""
        raise ValueError(f"clip_skip must be None or an int >= 0{most}, got {_describe(clip_skip)}")


def check_noise(generator, latents, num_images: int, latent_shape: tuple[int, ...]) -> None:
    """One generator or one per image; given latents of ``latent_shape`` (images, C, h, w), finite."""
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"generator must be a torch.Generator or a list of them, got {_describe(generator)}; "
            "for a seed, pass torch.Generator().manual_seed(seed)"
        )
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"generator is a list of {len(generator)} but {num_images} images are asked for: pass one "
            "torch.Generator or one per image"
        )
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != latent_shape:
            raise ValueError(
                f"latents must have shape {latent_shape} (images, channels, height/f, width/f), "
                f"got {_describe(latents)}"
            )
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or inf: pass finite starting noise (or latents=None)")


def check_output(output_type, tensor_inputs, allowed_tensor_inputs) -> None:
    """An output type we make, and callback tensor names the pipeline hands out."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    unknown = set(tensor_inputs) - set(allowed_tensor_inputs)
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs may name {list(allowed_tensor_inputs)}, "
            f"got {sorted(unknown)}"
        )


def check_ip_adapter(image, image_embeds, num_adapters: int, has_image_encoder: bool) -> None:
    """IP-Adapter inputs: images or precomputed embeddings (one entry per loaded adapter), not both."""
    if image is None and image_embeds is None:
        if num_adapters:  # the U-Net's IP-Adapter layers would fail on a missing input
            raise ValueError(
                f"{num_adapters} IP-Adapter(s) loaded: pass ip_adapter_image or ip_adapter_image_embeds, "
                "or pipe.unload_ip_adapter() to generate without"
            )
        return
    if image is not None and image_embeds is not None:
        raise ValueError("pass at most one of ip_adapter_image or ip_adapter_image_embeds, got both")
    name = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds"
    if num_adapters == 0:
        raise ValueError(f"{name} needs an IP-Adapter: call pipe.load_ip_adapter(...) first")
    if image is not None and not has_image_encoder:
        raise ValueError(
            "ip_adapter_image needs an image encoder, and this pipeline has none: load the IP-Adapter "
            "with its image_encoder_folder, or pass ip_adapter_image_embeds"
        )
    if image_embeds is not None and not (
        isinstance(image_embeds, list)
        and all(isinstance(e, torch.Tensor) and e.ndim in (3, 4) for e in image_embeds)
    ):
        raise ValueError(
            f"ip_adapter_image_embeds must be a list of 3-D or 4-D tensors, got {_describe(image_embeds)}"
        )
    given = image_embeds if image_embeds is not None else image
    count = len(given) if isinstance(given, list) else 1
    if count != num_adapters:
        raise ValueError(
            f"{count} IP-Adapter inputs for {num_adapters} loaded IP-Adapters: pass one per adapter (a list)"
        )


# ---- SDXL's own arguments (Podell et al. 2023): a second prompt, pooled embeddings, size conditioning ----


def check_prompts_xl(args: dict, num_prompts: int) -> None:
    """prompt_2 / negative_prompt_2 as text, not beside the embeddings they would make, and pooled
    embeddings (encoder 2's, (batch, width)) with every given prompt_embeds / negative_prompt_embeds."""
    for name, embeds in (("prompt_2", "prompt_embeds"), ("negative_prompt_2", "negative_prompt_embeds")):
        value = args[name]
        if value is None:
            continue
        if args[embeds] is not None:
            raise ValueError(f"pass {name} or {embeds} (the embeddings it would make), not both")
        if not _is_text(value):
            raise ValueError(f"{name} must be a str or a non-empty list of str, got {_describe(value)}")
        check_encodable(name, value)
        if isinstance(value, list) and len(value) != num_prompts:
            raise ValueError(
                f"{name} has {len(value)} entries but there are {num_prompts} prompts: pass one str for "
                f"all or a list of {num_prompts}"
            )
    for side in ("", "negative_"):
        embeds, pooled = args[f"{side}prompt_embeds"], args[f"{side}pooled_prompt_embeds"]
        if embeds is not None and pooled is None:
            raise ValueError(
                f"{side}prompt_embeds needs {side}pooled_prompt_embeds too (text encoder 2's pooled "
                "output): pass both, as encode_prompt returns them"
            )
        if pooled is not None and not (
            isinstance(pooled, torch.Tensor) and pooled.ndim == 2 and len(pooled) == num_prompts
        ):
            raise ValueError(
                f"{side}pooled_prompt_embeds must be a tensor of shape ({num_prompts}, width), "
                f"got {_describe(pooled)}"
            )


SIZE_CONDITIONS = (
    "original_size", "crops_coords_top_left", "target_size",
    "negative_original_size", "negative_crops_coords_top_left", "negative_target_size",
)  # fmt: skip


def check_size_conditioning(args: dict) -> None:
    """SDXL's micro-conditioning: sizes (height, width) > 0 and crops (top, left) >= 0, in pixels, or
    None for the sizes; denoising_end None or a fraction of the schedule in (0, 1]."""
    for name in SIZE_CONDITIONS:
        value, crop = args[name], name.endswith("crops_coords_top_left")
        if value is None and not crop:
            continue
        low = 0 if crop else 1
        if not (isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) and v >= low
                                                                                for v in value)):  # fmt: skip
            what = "(top, left) ints >= 0" if crop else "None or (height, width) ints >= 1"
            raise ValueError(f"{name} must be {what}, got {_describe(value)}")
    end = args["denoising_end"]
    if end is not None and not (_is_real(end) and 0 < end <= 1):
        raise ValueError(f"denoising_end must be None or a number in (0, 1], got {_describe(end)}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value, low=None, high=None) -> bool:
    """A finite real number (not a bool) in [low, high]."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _is_list(value) -> bool:
    return isinstance(value, (list, tuple)) and len(value) > 0


def _is_text(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )


def check_encodable(name: str, value: str | list[str]) -> None:
    """ValueError naming ``name`` (and the entry of a list) for a text that is not valid Unicode
    (``sdlite.tokenizer.check_text``: a byte that is not UTF-8 in a command-line argument)."""
    for i, text in enumerate([value] if isinstance(value, str) else value):
        check_text(text, name if isinstance(value, str) else f"{name}[{i}]")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]
