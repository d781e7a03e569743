"""The U-Net trainer's distillation section: ``distill: lcm`` turns the run into latent consistency
distillation (Luo et al. 2023; sdlite/lcm.py, training/lcm_step.py) of its pretrained model.

With ``lora: true`` the student is the model plus the adapter (LCM-LoRA) and the result an ordinary
LoRA file; without it the student is the whole U-Net. Either is sampled with ``LCMScheduler``
(``sdlite generate --scheduler lcm``). This module imports neither torch nor any model library.
"""

from __future__ import annotations

from dataclasses import dataclass

from training.checks import numbers_outside
from training.config.sections import Section, option


@dataclass
class DistillSection(Section):
    title = "Distillation"
    about = (
        "latent consistency distillation of the pretrained model (the teacher) into a few-step sampler "
        "(Luo et al. 2023): with lora an LCM-LoRA, else the whole U-Net; sample it with --scheduler lcm"
    )

    distill: str = option("none", '"lcm": consistency-distil the pretrained model; "none": train it')
    lcm_ddim_steps: int = option(50, "N, the teacher's DDIM solver steps over T (k = T / N timesteps each)")
    lcm_w_min: float = option(2.0, "the least guidance ω drawn per example (a pipeline's scale is 1 + ω)")
    lcm_w_max: float = option(14.0, "the most guidance ω drawn per example; lcm_w_min for one ω")
    lcm_guidance_interval: list[int] | None = option(
        None, "guide the teacher only at solver steps from t LO to HI (as generate's --guidance_interval)"
    )
    lcm_solver: str = option(
        "ddim", "the teacher's ODE step Ψ: ddim (first order), heun (second order, 2 more teacher passes)"
    )
    lcm_huber_c: float = option(0.001, "c of the pseudo-Huber distance √((x-y)² + c²) - c")
    lcm_target_decay: float = option(
        0.95, "μ of the target θ⁻ ← μ θ⁻ + (1-μ) θ (LCM Algorithm 1); 0: the student itself (LCM-LoRA's)"
    )

    @property
    def lcm(self) -> bool:
        return self.distill == "lcm"

    def problems(self) -> list[str]:
        problems = []
        if self.distill not in ("none", "lcm"):
            problems.append(f"distill={self.distill!r}: use lcm or none")
        if not 1 <= self.lcm_ddim_steps <= 1000:
            problems.append(f"lcm_ddim_steps={self.lcm_ddim_steps}: use 1 to 1000 (default 50)")
        if self.lcm_w_min > self.lcm_w_max:
            problems.append(f"lcm_w_min {self.lcm_w_min} is above lcm_w_max {self.lcm_w_max}")
        if self.lcm_solver not in ("ddim", "heun"):
            problems.append(f"lcm_solver={self.lcm_solver!r}: use ddim or heun")
        interval = self.lcm_guidance_interval
        if interval is not None and (len(interval) != 2 or not 0 <= interval[0] <= interval[1]):
            problems.append(f"lcm_guidance_interval={interval}: give two timesteps LO,HI with 0 <= LO <= HI")
        if not 0.0 <= self.lcm_target_decay < 1.0:
            problems.append(f"lcm_target_decay={self.lcm_target_decay}: use 0 <= μ < 1 (0.95 as LCM's)")
        problems += numbers_outside(self, "lcm_w_min", "lcm_w_max")
        return problems + numbers_outside(self, "lcm_huber_c", above=True)
