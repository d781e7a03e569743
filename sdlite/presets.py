"""Model presets: the configs of a latent text-to-image model, built from nothing but numbers.

A preset names one config for each part, in the keys diffusers' classes take, so a preset builds
real ``AutoencoderKL`` / ``UNet2DConditionModel`` / ``CLIPTextModel`` objects with random weights,
and a folder saved from them loads in diffusers.

- ``tiny``: 32 px images, 0.24 M-parameter VAE with f=4 (8x8x4 latents), 4.1 M-parameter U-Net,
  2-layer 64-wide text encoder. Learns the shapes data set on a 2-core CPU in minutes.
- ``small``: 64 px images, VAE f=4 (16x16x4 latents), 40 M-parameter U-Net; a laptop-GPU model.
- ``sd15``: the shapes of Stable Diffusion 1.5 (VAE f=8, 4 latent channels, U-Net 320/640/1280/1280,
  CLIP ViT-L/14 text encoder, 77 tokens), for benchmarks and as a from-scratch starting point.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class Preset:
    # Whether the trainer's from-scratch shape keys (text encoder layers, U-Net widths, middle block, layers
    # per level) reshape it through the with_* methods below.
    reshapeable: ClassVar[bool] = True

    name: str
    resolution: int  # pixels of the square training image
    vae: dict[str, Any]
    unet: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    max_length: int = 77  # tokens the text encoder sees, BOS and EOS included
    notes: str = field(default="", compare=False)

    @property
    def vae_factor(self) -> int:
        """Pixels per latent: each encoder block but the last halves the size."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_factor

    def config(self, part: str) -> dict[str, Any]:
        """A fresh copy of one part's config, safe for the caller to change."""
        return copy.deepcopy(getattr(self, part))

    def with_text_encoder_layers(self, layers: int) -> Preset:
        """This preset with ``layers`` transformer layers in its (first) text encoder. With 0 a token's
        hidden state is its own embedding plus its position's, through the final layer norm: no token
        sees another, so "red" and "circle" reach the U-Net's cross-attention apart."""
        return dataclasses.replace(self, text_encoder={**self.text_encoder, "num_hidden_layers": layers})

    def with_unet_channels(self, channels: list[int]) -> Preset:
        """This preset with a U-Net of ``channels`` per level (diffusers' ``block_out_channels``; as many
        levels as the preset's, each a multiple of its ``norm_num_groups``)."""
        return dataclasses.replace(self, unet={**self.unet, "block_out_channels": list(channels)})

    def without_unet_mid_block(self) -> Preset:
        """This preset with a U-Net whose lowest level's down block feeds its first up block directly
        (diffusers' ``mid_block_type=None``): two ResNet blocks and a transformer fewer per step."""
        return dataclasses.replace(self, unet={**self.unet, "mid_block_type": None})

    def with_unet_layers(self, layers: list[int]) -> Preset:
        """This preset with ``layers[i]`` ResNet blocks in level i's down block (diffusers'
        ``layers_per_block`` as a list; level i's up block has one more, for the skip its down block's
        input leaves). At 0 a level's down block is its downsampler alone, and nothing at the lowest."""
        return dataclasses.replace(self, unet={**self.unet, "layers_per_block": list(layers)})

    def unet_layers_problems(self, layers: list[int]) -> list[str]:
        widths = self.unet["block_out_channels"]
        name = f"unet_layers_per_block {list(layers)}"
        if len(layers) != len(widths):
            return [f"{name}: preset {self.name!r} has {len(widths)} levels, give {len(widths)} counts"]
        if any(n < 0 for n in layers):
            return [f"{name}: each count must be >= 0"]
        for level, n in enumerate(layers):
            # A level's first ResNet block is what changes its width; without one it keeps the width it
            # is handed (conv_in's, which is the first level's, at level 0).
            given = widths[max(level - 1, 0)]
            if n == 0 and widths[level] != given:
                return [
                    f"{name}: level {level} has no ResNet block to take {given} channels to "
                    f"{widths[level]}: give it at least 1, or the width {given}"
                ]
        return []

    def with_vae_channels(self, channels: list[int]) -> Preset:
        """This preset with a VAE of ``channels`` per level (as many levels as the preset's, so the same
        f; each a multiple of its ``norm_num_groups``)."""
        return dataclasses.replace(self, vae={**self.vae, "block_out_channels": list(channels)})

    def without_vae_mid_attention(self) -> Preset:
        """This preset with a VAE whose encoder and decoder middle blocks are their two ResNet blocks
        alone (diffusers' ``mid_block_add_attention=False``)."""
        return dataclasses.replace(self, vae={**self.vae, "mid_block_add_attention": False})

    def channels_problems(self, part: str, channels: list[int]) -> list[str]:
        """What is wrong with ``channels`` as the level widths of this preset's ``part`` ("unet" or "vae"),
        named as the config key that gives them."""
        config, name = getattr(self, part), f"{part}_block_out_channels {list(channels)}"
        levels, groups = len(config["block_out_channels"]), config["norm_num_groups"]
        if len(channels) != levels:
            return [f"{name}: preset {self.name!r} has {levels} levels, give {levels} widths"]
        if any(c <= 0 or c % groups for c in channels):
            return [f"{name}: each width must be a positive multiple of {groups} (the GroupNorm groups)"]
        if min(channels) < 2 * groups:
            # One channel per group normalises each channel alone over the image, which leaves a model
            # trained from scratch next to nothing to learn from (benchmarks/RESULTS.md has the runs).
            return [
                f"{name}: each width must be at least {2 * groups}: at {groups} wide each of the "
                f"{groups} GroupNorm groups holds one channel, and the model learns next to nothing"
            ]
        return []


def _vae(channels, layers, resolution, latent_channels=4, groups=32, scaling_factor=0.18215):
    n = len(channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(channels),
        layers_per_block=layers,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=resolution,
        scaling_factor=scaling_factor,
    )


def _unet(channels, layers, latent_size, cross_dim, head_dim, groups=32, cross_attn_blocks=None):
    n = len(channels)
    # By default attention at every level but the first (highest-resolution, where it costs most);
    # SD 1.x does the opposite and passes its own list.
    attn = cross_attn_blocks if cross_attn_blocks is not None else [False] + [True] * (n - 1)
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return dict(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(channels),
        layers_per_block=layers,
        cross_attention_dim=cross_dim,
        attention_head_dim=head_dim,
        norm_num_groups=groups,
    )


def _clip_text(width, layers, heads, max_length, act="quick_gelu", projection_dim=None):
    return dict(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=max_length,
        hidden_act=act,
        projection_dim=projection_dim or width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


# Ho et al. 2020's linear schedule. Latent models never clip x0 to [-1, 1]: latents go past it and
# clipping them draws the right shapes in the wrong colours. steps_offset=1 (sampling's "leading"
# timesteps k*T//n + 1) is what diffusers' StableDiffusionPipeline sets on every scheduler it is built
# with: a saved folder then loads there unchanged and samples the same timesteps as here.
DDPM_LINEAR = dict(
    num_train_timesteps=1000,
    beta_schedule="linear",
    beta_start=0.0001,
    beta_end=0.02,
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=False,
    steps_offset=1,
)
# Stable Diffusion's own scheduler settings.
SD_SCALED_LINEAR = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    variance_type="fixed_small",
    clip_sample=False,
    steps_offset=1,
    timestep_spacing="leading",
)

PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        resolution=32,
        vae=_vae([16, 32, 32], layers=1, resolution=32, groups=8),
        unet=_unet([32, 64, 128], layers=1, latent_size=8, cross_dim=64, head_dim=8, groups=16),
        text_encoder=_clip_text(64, layers=2, heads=4, max_length=16),
        scheduler=DDPM_LINEAR,
        max_length=16,
    ),
    "small": Preset(
        name="small",
        resolution=64,
        vae=_vae([64, 128, 128], layers=1, resolution=64),
        unet=_unet([128, 256, 256], layers=2, latent_size=16, cross_dim=256, head_dim=8),
        text_encoder=_clip_text(256, layers=4, heads=4, max_length=32),
        scheduler=DDPM_LINEAR,
        max_length=32,
    ),
    "sd15": Preset(
        name="sd15",
        resolution=512,
        vae=_vae([128, 256, 512, 512], layers=2, resolution=512),
        unet=_unet(
            [320, 640, 1280, 1280],
            layers=2,
            latent_size=64,
            cross_dim=768,
            head_dim=8,
            cross_attn_blocks=[True, True, True, False],
        ),
        text_encoder=_clip_text(768, layers=12, heads=12, max_length=77),
        scheduler=SD_SCALED_LINEAR,
        max_length=77,
    ),
}


# ---- Stable Diffusion XL (Podell et al. 2023) --------------------------------------------------
# Two text encoders and size/crop conditioning.
#
# An SDXL model is an SD model with three changes, all visible in the configs:
#
# - two text encoders: CLIP ViT-L (``text_encoder``, 768 wide) and OpenCLIP ViT-bigG with its
#   projection (``text_encoder_2``, 1280 wide, projected to 1280). The U-Net cross-attends to both
#   penultimate hidden states concatenated along the features: cross_attention_dim = 768 + 1280 = 2048;
# - added conditioning (``addition_embed_type="text_time"``): encoder 2's pooled, projected embedding
#   and six numbers (original height and width, crop top and left, target height and width), each
#   number sinusoidally embedded in ``addition_time_embed_dim`` channels; so the added embedding's
#   input has 6 * addition_time_embed_dim + projection_dim = 6 * 256 + 1280 = 2816 channels;
# - three U-Net levels (320/640/1280) with 1, 2 and 10 transformer layers and no attention at the
#   first, and a VAE of SD's shape whose latents scale by 0.13025 and which is upcast to float32
#   (``force_upcast``) because it overflows in float16.
#
# - ``sdxl``: the shapes of SDXL 1.0 base (U-Net 2,567,463,684 parameters; CLIP ViT-L 123,060,480;
#   OpenCLIP ViT-bigG with projection 694,659,840; VAE 83,653,863), 1024 px, 77 tokens.
# - ``tiny-sdxl``: the same conditioning structure at 32 px (VAE f=4, 8x8x4 latents), with two tiny
#   encoders of different widths (32 and 64) as SDXL's differ; trains on a CPU in seconds.

SIZE_CONDITIONS = 6  # original (h, w), crop top-left (top, left), target (h, w)


@dataclass(frozen=True)
class PresetXL(Preset):
    """A ``Preset`` with SDXL's second text encoder (CLIPTextModelWithProjection's config)."""

    text_encoder_2: dict[str, Any] = field(default_factory=dict)
    reshapeable: ClassVar[bool] = False  # built from the preset alone (sdlite.models_xl.build_components_xl)

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


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
