"""The arguments of the text-to-image pipeline, checked before any work is done.

Each bad argument raises a ValueError that names it and says what it allows, so a typo costs an
error message rather than a minute of denoising or a shape error deep inside the U-Net.
"""

from __future__ import annotations

import math
import numbers

import torch

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds")
UNCHECKED = object()  # the default of the optional checks: None is a value some arguments may not take


def check_text_to_image_inputs(
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
    *,
    vae_factor: int,
    latent_channels: int,
    embed_width: int,
    guidance_scale=UNCHECKED,
    eta=UNCHECKED,
    guidance_rescale=UNCHECKED,
    clip_skip=None,
    text_layers: int | None = None,
) -> int:
    """Raise ValueError on the first bad argument; return the number of prompts.

    guidance_scale, eta, guidance_rescale and clip_skip (with ``text_layers``, the text encoder's
    depth) are checked when passed.
    """
    if (prompt is None) == (prompt_embeds is None):
        got = "both" if prompt is not None else "neither"
        raise ValueError(f"pass exactly one of prompt or prompt_embeds, got {got}")
    if prompt is not None:
        if not _is_text(prompt):
            raise ValueError(f"prompt must be a str or a non-empty list of str, got {_describe(prompt)}")
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
    f = vae_factor
    for name, value in (("height", height), ("width", width)):
        if not _is_int(value) or value <= 0 or value % f:
            raise ValueError(f"{name} must be a positive multiple of {f} (the VAE factor), got {value!r}")
    if timesteps is None and (not _is_int(num_inference_steps) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an int >= 1, got {num_images_per_prompt!r}")
    if timesteps is not None and not (
        isinstance(timesteps, (list, tuple)) and len(timesteps) > 0 and all(_is_int(t) for t in timesteps)
    ):
        raise ValueError(f"timesteps must be a non-empty list of int, got {_describe(timesteps)}")
    for name, value, low, high, allowed in (
        ("guidance_scale", guidance_scale, None, None, "a finite number"),
        ("eta", eta, 0, None, "a finite number >= 0"),
        ("guidance_rescale", guidance_rescale, 0, 1, "a number in [0, 1]"),
    ):
        if value is not UNCHECKED and not _is_real(value, low, high):
            raise ValueError(f"{name} must be {allowed}, got {_describe(value)}")
    if clip_skip is not None and (
        not _is_int(clip_skip) or clip_skip < 0 or (text_layers is not None and clip_skip >= text_layers)
    ):
        most = f" and < {text_layers} (the text encoder's layers)" if text_layers is not None else ""
        raise ValueError(f"clip_skip must be None or an int >= 0{most}, got {_describe(clip_skip)}")
    generators = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in generators):
        raise ValueError(
            f"generator must be a torch.Generator or a list of them, got {_describe(generator)}; "
            "for a seed, pass torch.Generator().manual_seed(seed)"
        )
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    num_images = num_prompts * num_images_per_prompt
    if isinstance(generator, list) and len(generator) != num_images:
        raise ValueError(
            f"generator is a list of {len(generator)} but {num_images} images are asked for "
            f"({num_prompts} prompts x num_images_per_prompt={num_images_per_prompt}): pass one "
            "torch.Generator or one per image"
        )
    if latents is not None:
        expected = (num_images, latent_channels, height // f, width // f)
        if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != expected:
            raise ValueError(
                f"latents must have shape {expected} (images, channels, height/{f}, width/{f}), "
                f"got {_describe(latents)}"
            )
    unknown = set(callback_on_step_end_tensor_inputs) - set(CALLBACK_TENSOR_INPUTS)
    if unknown:
        raise ValueError(
            f"callback_on_step_end_tensor_inputs may name {CALLBACK_TENSOR_INPUTS}, got {sorted(unknown)}"
        )
    return num_prompts


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value, low=None, high=None) -> bool:
    """A finite real number (not a bool) in [low, high]."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return (low is None or value >= low) and (high is None or value <= high)


def _is_text(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) for v in value)
    )


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:120]
