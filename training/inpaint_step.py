"""Training an inpainting U-Net: the step's extra inputs, its random masks, and the widened first layer.

An inpainting U-Net (RunwayML's sd-v1-5-inpainting, Rombach et al. 2022 sec. 4.5 and its model card;
diffusers' inpainting training scripts) reads five more input channels beside x_t:

    input = cat(x_t, m, E(x ⊙ (1 - m)))     m: the mask at latent resolution, 1 where to paint
    loss  = ‖ε - ε_θ(input, t, c)‖²          Algorithm 1 of Ho et al. 2020 otherwise unchanged

where x ⊙ (1 - m) is the image in [-1, 1] with the masked pixels set to 0 (diffusers' convention:
``image * (mask < 0.5)``), encoded by the VAE (a draw of q(z | x), as the pipeline encodes it), and m is
the pixel mask taken to the latent grid by nearest-neighbour interpolation, as pipelines/inpaint.py
does. Each example's mask is random: with probability ``inpaint_full_mask_rate`` the whole image (so the
model keeps text to image: the masked image is then all zeros), else a rectangle or a brush stroke
(``inpaint_mask_kinds``) whose size is a fraction ``inpaint_mask_sizes`` of the image's side.

Every draw comes from a generator seeded by (seed, "mask", step, example) for each example of the
step's global batch, and the masked image's posterior noise from one seeded by (seed, "masked", step):
2 processes and a resumed run see exactly the masks of one uninterrupted process.

A 4-channel base is widened (``widen_conv_in``): conv_in takes 2C + 1 channels, the C + 1 new ones
with zero weights, so that at step 0 the model predicts exactly the base's ε whatever mask it is shown.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdlite.data.cache import sample_latents
from sdlite.data.samplers import seeded_generator
from sdlite.latents import vae_factor


def inpaint_channels(c: int) -> int:
    """The input channels of an inpainting U-Net over latents of ``c`` channels: x_t, m, masked image."""
    return 2 * c + 1


def widen_conv_in(unet, latent_channels: int) -> bool:
    """Make ``unet`` read the inpainting inputs: a U-Net of ``latent_channels`` inputs gets a conv_in of
    2C + 1 inputs whose new weights are zero (its output unchanged for any mask); one that reads them
    already is left as it is. Returns whether it was widened; ValueError for any other width."""
    old, wide = unet.conv_in, inpaint_channels(latent_channels)
    if old.in_channels == wide:
        return False
    if old.in_channels != latent_channels:
        raise ValueError(
            f"the U-Net takes {old.in_channels} input channels: inpainting trains an ordinary U-Net "
            f"({latent_channels}, widened) or an inpainting one ({wide}); give such a pretrained folder"
        )
    new = torch.nn.Conv2d(wide, old.out_channels, old.kernel_size, old.stride, old.padding,
                          bias=old.bias is not None).to(old.weight)  # fmt: skip
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, :latent_channels] = old.weight
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=wide)  # saved so that InpaintPipeline reads the folder as 9-channel
    return True


# ---- the masks ---------------------------------------------------------------------------------------


def draw_mask(generator: torch.Generator, height: int, width: int, full_rate: float, kinds: list[str],
              sizes: list[float]) -> torch.Tensor:  # fmt: skip
    """(1, H, W) float mask, 1 where to paint: the whole image with probability ``full_rate``, else one
    of ``kinds`` (chosen uniformly): a "rectangle" whose sides are uniform fractions in ``sizes`` of the
    image's, anywhere inside it; or a "stroke", a brush of width such a fraction along 1-3 straight
    segments between uniform points of the image."""
    u = lambda n=1: torch.rand(n, generator=generator, dtype=torch.float64)  # noqa: E731
    low, high = sizes
    if u().item() < full_rate:
        return torch.ones(1, height, width)
    kind = kinds[int(u().item() * len(kinds)) % len(kinds)]
    ys = torch.arange(height, dtype=torch.float64)[:, None] + 0.5
    xs = torch.arange(width, dtype=torch.float64)[None, :] + 0.5
    if kind == "rectangle":
        h, w = (low + (high - low) * u(2)) * torch.tensor([height, width], dtype=torch.float64)
        top, left = u().item() * (height - h), u().item() * (width - w)
        inside = (ys >= top) & (ys < top + h) & (xs >= left) & (xs < left + w)
        return inside.float()[None]
    # stroke: the points within half the brush's width of any segment
    radius = (low + (high - low) * u().item()) * min(height, width) / 2
    segments = 1 + int(u().item() * 3) % 3
    points = u(2 * (segments + 1)).view(-1, 2) * torch.tensor([height, width], dtype=torch.float64)
    inside = torch.zeros(height, width, dtype=torch.bool)
    for (ay, ax), (by, bx) in zip(points[:-1].tolist(), points[1:].tolist()):
        dy, dx = by - ay, bx - ax
        along = ((ys - ay) * dy + (xs - ax) * dx) / max(dy * dy + dx * dx, 1e-12)
        along = along.clamp(0, 1)  # the nearest point of the segment
        inside |= (ys - ay - along * dy) ** 2 + (xs - ax - along * dx) ** 2 <= radius**2
    return inside.float()[None]


def draw_inpaint(seed: int, step, G: int, latent_shape: tuple[int, int, int], factor: int, full_rate: float,
                 kinds: list[str], sizes: list[float], device) -> dict:  # fmt: skip
    """The inpainting draws of one step (or of a fixed batch, ``step`` a name) for its whole global batch
    of G examples: "mask" (G, 1, H, W) in pixels, 1 where to paint, each from its own generator
    (seed, "mask", step, i); "masked_noise" (G, C, h, w), the masked image's posterior draw."""
    c, h, w = latent_shape
    masks = [
        draw_mask(seeded_generator(seed, "mask", step, i), h * factor, w * factor, full_rate, kinds, sizes)
        for i in range(G)
    ]
    noise = torch.randn((G, c, h, w), generator=seeded_generator(seed, "masked", step, device=device),
                        device=device)  # fmt: skip
    return {"mask": torch.stack(masks).to(device), "masked_noise": noise}


def inpaint_inputs(pixels: torch.Tensor, mask: torch.Tensor, vae, masked_noise: torch.Tensor) -> torch.Tensor:
    """(B, C + 1, h, w): the mask at latent resolution (nearest, as the pipeline takes it) and the latents
    of the masked image x ⊙ (mask < 0.5), drawn from q(z | x ⊙ (mask < 0.5)) with ``masked_noise``."""
    latent_mask = F.interpolate(mask, size=masked_noise.shape[-2:])  # nearest: stays 0 or 1
    with torch.no_grad():
        posterior = vae.encode(pixels * (mask < 0.5)).latent_dist
    masked = sample_latents({"mean": posterior.mean, "std": posterior.std}, masked_noise, vae.config)
    return torch.cat([latent_mask.to(masked.dtype), masked], dim=1)


class Inpainting:
    """An inpainting run's part of the step (``UNetTrainer``, train.py): widens the U-Net when made, then
    draws each step's masks and makes the U-Net's extra channels from a batch's pixels."""

    def __init__(self, section, seed: int, family):
        self.section, self.seed, self.vae = section, seed, family.parts.vae
        self.factor = vae_factor(self.vae.config)
        self.widened = widen_conv_in(family.parts.unet, self.vae.config.latent_channels)

    def draw(self, step, G: int, latent_shape: tuple[int, int, int], device) -> dict:
        s = self.section
        return draw_inpaint(self.seed, step, G, latent_shape, self.factor, s.inpaint_full_mask_rate,
                            s.inpaint_mask_kinds, s.inpaint_mask_sizes, device)  # fmt: skip

    def inputs(self, batch: dict, draws: dict) -> torch.Tensor:
        """The step's (B, C + 1, h, w) beside x_t, from the batch's pixels and its slice of the draws."""
        return inpaint_inputs(batch["pixels"], draws["mask"], self.vae, draws["masked_noise"])

    def held_out(self, batch: dict, latent_shape: tuple[int, int, int], device) -> torch.Tensor:
        """The held-out batch's extra channels, from masks fixed for the whole run."""
        draws = self.draw("validation", len(batch["pixels"]), latent_shape, device)
        return self.inputs(batch, draws)
