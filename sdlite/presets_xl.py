"""Stable Diffusion XL presets (Podell et al. 2023): two text encoders and size/crop conditioning.

An SDXL model is an SD model with three changes, all visible in the configs:

- two text encoders: CLIP ViT-L (``text_encoder``, 768 wide) and OpenCLIP ViT-bigG with its
  projection (``text_encoder_2``, 1280 wide, projected to 1280). The U-Net cross-attends to both
  penultimate hidden states concatenated along the features: cross_attention_dim = 768 + 1280 = 2048;
- added conditioning (``addition_embed_type="text_time"``): encoder 2's pooled, projected embedding
  and six numbers (original height and width, crop top and left, target height and width), each
  number sinusoidally embedded in ``addition_time_embed_dim`` channels; so the added embedding's
  input has 6 * addition_time_embed_dim + projection_dim = 6 * 256 + 1280 = 2816 channels;
- three U-Net levels (320/640/1280) with 1, 2 and 10 transformer layers and no attention at the
  first, and a VAE of SD's shape whose latents scale by 0.13025 and which is upcast to float32
  (``force_upcast``) because it overflows in float16.

- ``sdxl``: the shapes of SDXL 1.0 base (U-Net 2,567,463,684 parameters; CLIP ViT-L 123,060,480;
  OpenCLIP ViT-bigG with projection 694,659,840; VAE 83,653,863), 1024 px, 77 tokens.
- ``tiny-sdxl``: the same conditioning structure at 32 px (VAE f=4, 8x8x4 latents), with two tiny
  encoders of different widths (32 and 64) as SDXL's differ; trains on a CPU in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sdlite.presets import DDPM_LINEAR, PRESETS, SD_SCALED_LINEAR, Preset, _clip_text, _unet, _vae

SIZE_CONDITIONS = 6  # original (h, w), crop top-left (top, left), target (h, w)


@dataclass(frozen=True)
class PresetXL(Preset):
    """A ``Preset`` with SDXL's second text encoder (CLIPTextModelWithProjection's config)."""

    text_encoder_2: dict[str, Any] = field(default_factory=dict)

    @property
    def cross_attention_dim(self) -> int:
        return self.text_encoder["hidden_size"] + self.text_encoder_2["hidden_size"]


def _unet_xl(channels, layers, latent_size, heads, transformer_layers, text_widths, projection_dim,
             time_embed_dim, groups=32):  # fmt: skip
    """SDXL's U-Net: no attention at the first level, ``transformer_layers`` per level (the mid block
    takes the last), cross-attention over both encoders, and the "text_time" added embedding."""
    unet = _unet(
        channels, layers, latent_size, cross_dim=sum(text_widths), head_dim=list(heads), groups=groups
    )
    unet.update(
        transformer_layers_per_block=list(transformer_layers),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=SIZE_CONDITIONS * time_embed_dim + projection_dim,
    )
    return unet


def _vae_xl(channels, layers, resolution, groups=32):
    # SDXL's VAE: SD's shape with its own latent scale; float16 overflows it, so diffusers upcasts.
    return {**_vae(channels, layers, resolution, groups=groups, scaling_factor=0.13025), "force_upcast": True}


XL_PRESETS: dict[str, PresetXL] = {
    "sdxl": PresetXL(
        name="sdxl",
        resolution=1024,
        vae=_vae_xl([128, 256, 512, 512], layers=2, resolution=1024),
        unet=_unet_xl(
            [320, 640, 1280],
            layers=2,
            latent_size=128,
            heads=[5, 10, 20],  # diffusers' attention_head_dim here counts heads (of 64 channels)
            transformer_layers=[1, 2, 10],
            text_widths=(768, 1280),
            projection_dim=1280,
            time_embed_dim=256,
        ),
        text_encoder=_clip_text(768, layers=12, heads=12, max_length=77),
        text_encoder_2=_clip_text(1280, layers=32, heads=20, max_length=77, act="gelu", projection_dim=1280),
        scheduler=SD_SCALED_LINEAR,
        max_length=77,
    ),
    "tiny-sdxl": PresetXL(
        name="tiny-sdxl",
        resolution=32,
        vae=_vae_xl([16, 32, 32], layers=1, resolution=32, groups=8),
        unet=_unet_xl(
            [32, 64, 128],
            layers=1,
            latent_size=8,
            heads=[2, 4, 8],  # 16 channels a head
            transformer_layers=[1, 1, 2],
            text_widths=(32, 64),
            projection_dim=32,  # unlike SDXL's, not the width: a transposed projection cannot pass
            time_embed_dim=8,
            groups=16,
        ),
        text_encoder=_clip_text(32, layers=2, heads=2, max_length=16),
        text_encoder_2=_clip_text(64, layers=2, heads=4, max_length=16, act="gelu", projection_dim=32),
        scheduler=DDPM_LINEAR,
        max_length=16,
    ),
}

PRESETS.update(XL_PRESETS)  # one lookup: get_preset("sdxl") works wherever get_preset("sd15") does
