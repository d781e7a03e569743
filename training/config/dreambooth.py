"""The DreamBooth section of the U-Net trainer's config (Ruiz et al. 2023): a subject's photos, and the
class images whose prior-preservation loss keeps what the model knew of their class."""

from __future__ import annotations

from dataclasses import dataclass

from training.checks import numbers_outside
from training.config.sections import Section, option


@dataclass
class DreamBoothSection(Section):
    title = "DreamBooth"
    about = (
        "(Ruiz et al. 2023): teach a subject from a few photos, train_data_dir unused; with class_data_dir "
        "each batch adds as many class images, kept by the prior-preservation loss."
    )

    instance_data_dir: str | None = option(
        None, "the subject's photos (any image folder); None: no DreamBooth"
    )
    instance_prompt: str = option(
        "", 'the caption of every subject photo, with a rare token: "a photo of sks dog"'
    )
    class_data_dir: str | None = option(None, "class images; topped up to num_class_images by the base model")
    class_prompt: str = option("", 'the class images\' caption and generating prompt: "a photo of a dog"')
    num_class_images: int = option(100, "class images wanted; those missing are generated before training")
    prior_loss_weight: float = option(1.0, "the class images' loss weight (Ruiz et al. eq. 2's λ)")
    sample_batch_size: int = option(
        4, "images per batch when generating class images (validation_inference_steps)"
    )

    def problems(self) -> list[str]:
        problems = []
        if self.class_data_dir and not self.instance_data_dir:
            problems.append("class_data_dir without instance_data_dir: give the subject's photos too")
        if self.instance_data_dir and not self.instance_prompt.strip():
            problems.append("instance_data_dir without instance_prompt: e.g. 'a photo of sks dog'")
        if self.class_data_dir and not self.class_prompt.strip():
            problems.append("class_data_dir without class_prompt: e.g. --class_prompt 'a photo of a dog'")
        if self.num_class_images < 0 or self.sample_batch_size < 1:
            problems.append("num_class_images must be >= 0, sample_batch_size >= 1")
        return problems + numbers_outside(self, "prior_loss_weight")
