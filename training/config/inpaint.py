"""The U-Net trainer's inpainting section: ``inpainting: true`` trains an inpainting U-Net (x_t, the
mask and the masked image's latents in; training/inpaint_step.py) with random masks per example.

This module imports neither torch nor any model library.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from training.checks import numbers_outside
from training.config.sections import Section, option

MASK_KINDS = ("rectangle", "stroke")


@dataclass
class InpaintSection(Section):
    title = "Inpainting"
    about = (
        "train an inpainting U-Net (RunwayML's sd-inpainting): the mask and the masked image's latents "
        "as 5 more input channels; a 4-channel base's conv_in is widened with zero weights"
    )

    inpainting: bool = option(False, "train an inpainting U-Net on random masks (final_dir: in_channels 9)")
    inpaint_full_mask_rate: float = option(
        0.25, "the fraction of examples masked whole, so that the model keeps text to image"
    )
    inpaint_mask_kinds: list[str] = option(
        list(MASK_KINDS), "the other masks' kinds, one drawn per example: rectangle, stroke"
    )
    inpaint_mask_sizes: list[float] = option(
        [0.1, 0.75], "LO HI: a rectangle's sides, a stroke's width, as fractions of the image's side"
    )

    def problems(self) -> list[str]:
        problems = numbers_outside(self, "inpaint_full_mask_rate", high=1)
        unknown = [kind for kind in self.inpaint_mask_kinds if kind not in MASK_KINDS]
        if unknown or not self.inpaint_mask_kinds:
            problems.append(
                f"inpaint_mask_kinds={self.inpaint_mask_kinds}: name one or both of rectangle, stroke"
            )
        sizes = self.inpaint_mask_sizes
        if len(sizes) != 2 or not 0 < sizes[0] <= sizes[1] <= 1:
            problems.append(f"inpaint_mask_sizes={sizes}: give LO HI with 0 < LO <= HI <= 1")
        return problems


def inpaint_contradictions(cfg) -> list[str]:
    """What an inpainting run (``cfg``: a TrainConfig, training/config/unet.py, which calls this) cannot
    take, and inpaint_* keys set on a run that does not inpaint."""
    section = cfg.inpaint
    if not section.inpainting:
        given = [f.name for f in fields(section) if f.name != "inpainting"
                 and getattr(section, f.name) != getattr(InpaintSection(), f.name)]  # fmt: skip
        return (
            [f"{', '.join(given)} set without inpainting: add --inpainting true, or leave them out"]
            if given
            else []
        )
    refused = (
        (cfg.data.cache_latents, "cache_latents: each step's masked image is encoded from its pixels; "
         "set cache_latents false"),
        (cfg.data.release_encoders, "release_encoders: the VAE encodes each step's masked image; "
         "set it false"),
        (cfg.adapters.lora, "lora: the widened conv_in's new channels must train; train the U-Net "
         "(lora false)"),
        (cfg.inverts, "textual_inversion_token: teach a word, or train inpainting; not both"),
        (cfg.distillation.lcm, "distill lcm: the teacher reads no mask; distil an inpainting model apart"),
        (cfg.dreambooth.class_data_dir, "class_data_dir: class images come from a text-to-image pipeline, "
         "which an inpainting U-Net does not run; leave it out"),
        (cfg.validation.validation_image, "validation_image: image to image runs an ordinary U-Net; leave "
         "it out (the sample prompts are drawn with a full mask)"),
    )  # fmt: skip
    return [f"inpainting with {why}" for on, why in refused if on]
