"""The VAE trainer's config (training/train_vae.py): the shared sections with other defaults, a few keys
of its own."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sdlite.presets import PRESETS, Preset
from training.checks import counts_below, numbers_outside
from training.config.sections import Config, Section, option, section
from training.config.shared import DIFFUSERS_FLAGS, DataBase, OptimizerBase, RunBase


@dataclasses.dataclass
class VAEModelSection(Section):
    title = "The model"

    preset: str = option("tiny", "the sdlite.presets VAE to build with random weights")
    vae_block_out_channels: list[int] | None = option(
        None, "the preset's VAE with these level widths (same f)"
    )
    vae_mid_block_attention: bool = option(True, "false: the middle blocks without their self-attention")

    def problems(self) -> list[str]:
        preset = PRESETS.get(self.preset)  # an unknown one is refused when built
        if preset is not None and self.vae_block_out_channels is not None:
            return preset.channels_problems("vae", self.vae_block_out_channels)
        return []

    def shaped_preset(self, preset: Preset) -> Preset:
        """The preset with this section's VAE shape keys applied: what train_vae.py builds."""
        if self.vae_block_out_channels is not None:
            preset = preset.with_vae_channels(self.vae_block_out_channels)
        if not self.vae_mid_block_attention:
            preset = preset.without_vae_mid_attention()
        return preset


@dataclasses.dataclass
class VAEDataSection(DataBase):
    eval_data_dir: str | None = option(None, "held-out images for PSNR; None: hold out eval_count of train")
    eval_count: int = option(256, "images held out of train_data_dir when eval_data_dir is None")

    def problems(self) -> list[str]:
        return super().problems() + counts_below(self, 1, "eval_count")


@dataclasses.dataclass
class VAEOptimizerSection(OptimizerBase):
    about = "a VAE at a constant rate can end on a loss spike; cosine decays to 0 at max_steps"

    max_steps: int = 600
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    adam_weight_decay: float = 0.0
    reconstruction_loss: str = option("mse", '"mse" or "l1"')
    kl_weight: float = option(1e-6, "the weight of KL(q(z|x) ‖ N(0, I)) against the reconstruction loss")
    edge_weight: float = option(
        0.0, "pixels weigh 1 + this x their contrast with their 3x3 neighbours (corners most); 0: plain mean"
    )

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.reconstruction_loss not in ("mse", "l1"):
            problems.append(f"reconstruction_loss={self.reconstruction_loss!r}: use mse or l1")
        return problems + numbers_outside(self, "kl_weight", "edge_weight")


@dataclasses.dataclass
class VAERunSection(RunBase):
    output_dir: str = "runs/tiny-vae"
    log_every: int = 100
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = 2
    scale_count: int = option(1024, "training images encoded to measure the latents' std")
    eval_every: int = option(0, "steps between held-out PSNR reports; 0: only at the end")

    def problems(self) -> list[str]:
        return super().problems() + counts_below(self, 1, "scale_count") + counts_below(self, 0, "eval_every")


@dataclasses.dataclass
class VAETrainConfig(Config):
    """Train the preset's AutoencoderKL from scratch on an image folder."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS | {
        "pretrained_model_name_or_path": "train_vae.py trains the --preset's VAE from random weights",
    }

    model: VAEModelSection = section(VAEModelSection)
    data: VAEDataSection = section(VAEDataSection)
    optimizer: VAEOptimizerSection = section(VAEOptimizerSection)
    run: VAERunSection = section(VAERunSection)
