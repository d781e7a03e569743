"""The samplers ``sdlite generate --scheduler`` offers: a short name -> a diffusers scheduler class.

Each is made ``from_config`` of the model's own scheduler config, so that it keeps the model's noise
schedule (betas, T, prediction type) and changes only how the reverse process is stepped. The table is
plain data, read by the parser without importing diffusers; ``make_scheduler`` imports it.
"""

from __future__ import annotations

from typing import Any

# name -> (diffusers class, config keys that make the variant); "ddpm" keeps the model's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "ddpm": None,  # Ho et al. 2020, Algorithm 2 (sdlite.ddpm)
    "ddim": ("DDIMScheduler", {}),  # Song et al. 2021, eta = 0: deterministic
    "euler": ("EulerDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 1 (first order)
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),  # Euler with fresh noise each step
    "heun": ("HeunDiscreteScheduler", {}),  # Karras et al. 2022, Algorithm 1 (second order)
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # Liu et al. 2022, PLMS steps only, as SD
    "lms": ("LMSDiscreteScheduler", {}),  # linear multistep (needs scipy)
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # Lu et al. 2022, 2M
    "dpm++_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),  # 2M SDE
    "unipc": ("UniPCMultistepScheduler", {}),  # Zhao et al. 2023
    "deis": ("DEISMultistepScheduler", {}),  # Zhang & Chen 2023
    # Luo et al. 2023: a latent consistency model's (an LCM-LoRA's) few-step sampler, 2-8 steps at guidance 1
    "lcm": ("LCMScheduler", {}),
}


def make_scheduler(name: str, config: dict) -> Any | None:
    """The scheduler ``name`` made from ``config`` (a scheduler's config), or None for "ddpm"."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    if SCHEDULERS[name] is None:
        return None
    import diffusers

    class_name, variant = SCHEDULERS[name]
    try:
        return getattr(diffusers, class_name).from_config(config, **variant)
    except ImportError as e:  # diffusers' placeholder for a class whose optional package is missing
        raise ValueError(
            f"--scheduler {name} ({class_name}) cannot be used here: {' '.join(str(e).split())}"
        ) from None
