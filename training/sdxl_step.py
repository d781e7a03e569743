"""SDXL's additions to the U-Net step (Podell et al. 2023, sec. 2.2): the six size/crop numbers of each
example and ε_θ(x_t, t, c, pooled, time ids). Building blocks only: UNetTrainer does not use them yet.
"""

from __future__ import annotations

import torch

from sdlite.data.dataset import ImageTransform


def square_time_ids(transform: ImageTransform, size: tuple[int, int], index: int, flip: bool = False):
    """(orig h, orig w, crop top, crop left, target h, target w) of an image of original (w, h) under the
    square transform, as BucketTransform.conditioning gives them for buckets; a flipped image's crop is
    measured from its new left edge."""
    left, top, right, bottom = transform.crop_box(size, index)
    if flip:
        left = transform.resized_size(size)[0] - right
    return size[1], size[0], top, left, bottom - top, right - left


class DenoiserXL(torch.nn.Module):
    """ε_θ(x_t, t, c) for SDXL's U-Net: c is (embeds (B, L, d1+d2), pooled (B, p), time ids (B, 6))."""

    def __init__(self, unet, channels_last: bool = False):
        super().__init__()
        self.unet, self.channels_last = unet, channels_last

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: tuple) -> torch.Tensor:
        embeds, pooled, time_ids = text
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
        return self.unet(x_t, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
