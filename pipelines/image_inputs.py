"""The image arguments of image-to-image and inpainting calls, checked before any work is done.

As in ``inputs.py`` (the text-to-image arguments), each bad argument raises a ValueError that names it
and says what it allows: a mask of the wrong kind or a strength that leaves no step to run costs an
error message rather than a VAE pass and a shape error deep inside the U-Net.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch

from pipelines.inputs import _describe, _is_int, _is_real

IMAGE_KINDS = (PIL.Image.Image, np.ndarray, torch.Tensor)


def check_image(name: str, image, latent_channels: int | None = None) -> None:
    """A PIL image, an array (H, W, C) / (B, H, W, C), a tensor (C, H, W) / (B, C, H, W) in [0, 1],
    or a non-empty list of one of them; tensors may also be latents of ``latent_channels``."""
    items = image if isinstance(image, list) else [image]
    kinds = {type(item) for item in items}
    if not items or not all(isinstance(item, IMAGE_KINDS) for item in items) or len(kinds) > 1:
        raise ValueError(
            f"{name} must be a PIL image, a numpy array, a torch tensor, or a non-empty list of one of "
            f"them, got {_describe(image)}"
        )
    for item in items:
        if isinstance(item, PIL.Image.Image):
            continue
        channels = item.shape[-3] if isinstance(item, torch.Tensor) else item.shape[-1]
        allowed = {1, 3} | (
            {latent_channels} if latent_channels and isinstance(item, torch.Tensor) else set()
        )
        if item.ndim not in (3, 4) or channels not in allowed or min(item.shape) == 0:
            layout = (
                "(B, C, H, W) or (C, H, W)" if isinstance(item, torch.Tensor) else "(B, H, W, C) or (H, W, C)"
            )
            raise ValueError(
                f"{name} must be {layout} with C in {sorted(allowed)}, got {_describe(item)}"
                + (f" of shape {item.shape}" if isinstance(item, np.ndarray) else "")
            )


def check_strength(strength, steps: int | None) -> None:
    """strength in [0, 1], leaving at least one of the schedule's ``steps`` to run (steps x strength
    >= 1); None: the schedule's start is set otherwise (SDXL's denoising_start)."""
    if not _is_real(strength, 0, 1):
        raise ValueError(f"strength must be a number in [0, 1], got {_describe(strength)}")
    if steps is not None and int(steps * strength) < 1:
        raise ValueError(
            f"strength={strength:g} of {steps} steps leaves no step to run (int(steps x strength) = 0): "
            f"raise strength to at least {1 / steps:.3g} or the number of steps"
        )


def check_image_count(name: str, count: int, num_prompts: int, num_images: int) -> None:
    """One image for every image made, one per prompt, or one for all."""
    if count not in (1, num_prompts, num_images):
        raise ValueError(
            f"{name} holds {count} images for {num_prompts} prompts making {num_images} images: pass one "
            f"image, one per prompt ({num_prompts}) or one per image made ({num_images})"
        )


def check_mask_crop(padding_mask_crop, image, mask_image, output_type: str) -> None:
    """padding_mask_crop: None, or pixels of margin around the mask's box (an int >= 0) for one PIL
    image and mask, with PIL output (the result is pasted back into the image)."""
    if padding_mask_crop is None:
        return
    if not _is_int(padding_mask_crop) or padding_mask_crop < 0:
        raise ValueError(f"padding_mask_crop must be None or an int >= 0, got {_describe(padding_mask_crop)}")
    for name, value in (("image", image), ("mask_image", mask_image)):
        if not isinstance(value, PIL.Image.Image):
            raise ValueError(
                f"padding_mask_crop needs {name} as one PIL image (the crop is pasted back into it), "
                f"got {_describe(value)}"
            )
    if output_type != "pil":
        raise ValueError(
            f"padding_mask_crop needs output_type='pil' (the crop is pasted back), got {output_type!r}"
        )


def check_strength_start(strength, latents) -> None:
    """Given latents are pure noise x_T, so they start the whole schedule: strength 1 only."""
    if latents is not None and strength < 1:
        raise ValueError(
            f"latents (the starting noise x_T) need strength=1; with strength={strength:g} the start is "
            "the image's own q(x_t | x_0): pass latents=None or strength=1"
        )
