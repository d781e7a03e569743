"""The validation section of the U-Net trainer's config: the sample images (from prompts, a prompts
file, and an image to redraw), their sampler, and the held-out loss."""

from __future__ import annotations

from dataclasses import dataclass

from training.checks import counts_below, numbers_outside
from training.config.sections import Section, option
from training.sample_prompts import prompts_file_problems


@dataclass
class ValidationSection(Section):
    title = "Validation"
    about = "sample images and a held-out loss, every validation_every steps and at the end"

    validation_prompts: list[str] = option(
        [],
        "prompts sampled into validation/step-N.png; on the command line each value is one prompt, commas "
        "and all: give several, or repeat the flag",
    )
    validation_prompts_file: str | None = option(
        None,
        "a text file of prompts sampled after validation_prompts, one a line, sd-scripts' format: "
        '"a red circle --n blurry --s 30 --l 4.5 --d 7 --w 64 --h 32"',
    )
    validation_every: int = option(0, "steps between validations; 0: only at the end")
    validation_inference_steps: int = option(50, "sampling steps of the validation images")
    validation_guidance: float = option(7.5, "classifier-free guidance scale of the validation images")
    val_data_dir: str | None = option(None, "held-out data for the validation loss (same formats as train)")
    val_count: int = option(64, "held-out items used")
    val_timesteps: list[int] = option([100, 300, 500, 700, 900], "validation loss t")
    validation_image: str | None = option(
        None,
        "an image redrawn toward the first sample prompt by image to image at each validation, beside "
        "the prompts' images (validation/step-N-image.png)",
    )
    validation_strength: float = option(0.6, "validation_image's strength: the share of the schedule redrawn")

    def problems(self) -> list[str]:
        """Also what would only show at the first validation."""
        problems = counts_below(self, 0, "validation_every") + counts_below(self, 1, "val_count")
        problems += numbers_outside(self, "validation_guidance")
        empty = [i + 1 for i, prompt in enumerate(self.validation_prompts) if not prompt.strip()]
        if empty:
            problems.append(f"validation_prompts item(s) {empty} empty: remove them (or the stray comma)")
        if not 1 <= self.validation_inference_steps <= 1000:  # as a prompts file's --s
            problems.append(
                f"validation_inference_steps={self.validation_inference_steps}: use 1 to 1000 (default 50)"
            )
        if not self.val_timesteps or not all(0 <= t < 1000 for t in self.val_timesteps):
            problems.append(
                f"val_timesteps={self.val_timesteps}: use timesteps from 0 to 999, e.g. 100,500,900"
            )
        return problems + prompts_file_problems(self.validation_prompts_file) + self.image_problems()

    def image_problems(self) -> list[str]:
        """validation_image: a file PIL reads, a prompt to redraw it toward, a strength that runs a step."""
        strength, steps = self.validation_strength, self.validation_inference_steps
        if not 0 < strength <= 1:  # NaN too
            return [f"validation_strength={strength}: use a number in (0, 1], e.g. 0.6"]
        if self.validation_image is None:
            return []
        if int(steps * strength) < 1:
            return [
                f"validation_strength={strength} of validation_inference_steps={steps} runs no step: "
                f"raise either (at least {1 / steps:.3g} of {steps} steps)"
            ]
        if not (self.validation_prompts or self.validation_prompts_file):
            return ["validation_image needs a prompt to redraw it toward: give validation_prompts too"]
        from PIL import Image  # here, not at the top: a config parses without image libraries

        name = self.validation_image
        try:
            with Image.open(name) as image:
                image.verify()
        except FileNotFoundError:
            return [f"validation_image={name!r}: no such file; give an image file or leave it out"]
        except Exception as e:  # PIL raises many kinds for a file that is not an image
            return [f"validation_image={name!r} is not an image PIL reads ({e}): give a PNG or JPEG"]
        return []
