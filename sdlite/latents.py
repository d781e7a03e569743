"""The latent codec: pixels <-> the latents the U-Net is trained and sampled on.

Rombach et al. 2022 (sec. 3.1, appendix G) scale the VAE's latents to unit variance before diffusion;
diffusers records that as the VAE config's ``scaling_factor`` and, for VAEs whose latents are not
centred, a ``shift_factor`` subtracted first (it is None or absent for SD 1.x/2.x and SDXL's VAEs):

    x_0 = scaling_factor * (z - shift_factor),   z ~ q(z | image)
    z   = x_0 / scaling_factor + shift_factor                        (before the VAE decodes)

Every place that crosses that boundary (the latent cache, the training step, evaluation, the
pipelines) goes through these functions, so the scale and the shift are applied alike everywhere.
"""

from __future__ import annotations

import torch


def vae_factor(vae_config: dict) -> int:
    """Pixels per latent along each side: every encoder block but the last halves the size."""
    channels = (
        vae_config["block_out_channels"] if isinstance(vae_config, dict) else vae_config.block_out_channels
    )
    return 2 ** (len(channels) - 1)


def _scale_and_shift(vae_config) -> tuple[float, float]:
    # vae.config (diffusers' FrozenDict) and a preset's dict read alike.
    return vae_config.get("scaling_factor", 1.0), vae_config.get("shift_factor") or 0.0


def to_latents(z: torch.Tensor, vae_config) -> torch.Tensor:
    """x_0 = scaling_factor * (z - shift_factor) for z drawn from the VAE's posterior q(z|x)."""
    scale, shift = _scale_and_shift(vae_config)
    return (z - shift) * scale


def from_latents(x0: torch.Tensor, vae_config) -> torch.Tensor:
    """z = x_0 / scaling_factor + shift_factor: what the VAE's decoder takes."""
    scale, shift = _scale_and_shift(vae_config)
    return x0 / scale + shift


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> (B, C, H/f, W/f) latents x_0, z drawn with ``generator``."""
    z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return to_latents(z, vae.config)


@torch.no_grad()
def decode(vae, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, C, h, w) latents x_0 -> (B, 3, h*f, w*f) pixels in the VAE's [-1, 1] (not clamped)."""
    z = from_latents(x0.to(vae.dtype), vae.config)
    return vae.decode(z, return_dict=False, generator=generator)[0]
