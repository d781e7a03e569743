"""The model families the U-Net trainer knows, and the one a run's config names.

A new family is a module with a subclass of ``training.family.StableDiffusion`` overriding the hooks
that differ, and a line here; the most specific families come first, the fallback last.
"""

from __future__ import annotations

from pathlib import Path

from training.config.unet import ModelSection
from training.family import StableDiffusion
from training.family_sdxl import StableDiffusionXL

FAMILIES: tuple[type[StableDiffusion], ...] = (
    StableDiffusionXL,
    StableDiffusion,
)


def family_of(model: ModelSection) -> type[StableDiffusion]:
    """The family of the run's model (its pretrained folder or its preset), from the config alone."""
    return next(family for family in FAMILIES if family.claims(model))


def family_of_folder(path: str | Path) -> type[StableDiffusion]:
    """The family of a model folder (``sdlite generate`` asks it which pipeline loads the folder)."""
    return family_of(ModelSection(pretrained=str(path)))


def family_of_pipeline(pipe) -> type[StableDiffusion]:
    """The family whose text-to-image pipeline ``pipe`` is (a single file's: its loader chose it)."""
    return next(family for family in FAMILIES if isinstance(pipe, family.pipeline_class()))
