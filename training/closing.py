"""What the end of a U-Net run prints: the files it wrote and a ready-to-paste line that uses them."""

from __future__ import annotations

import math
from pathlib import Path

from sdlite.cli import final_message

# σ/α = √((1 - ᾱ) / ᾱ) at t = T - 1 of SD's schedule (ᾱ = 0.0047), for which LCMScheduler spaces its steps
# from T - 1. Twice that and more (the DDPM paper's linear β: 157), its first steps estimate noise, and
# starting lower read better on the demo's model (benchmarks/RESULTS.md, "Where the 4 steps fall").
SD_NOISE_RATIO = 14.6


def noisy_start(alphas_cumprod) -> str:
    """A line for an LCM run whose model's schedule ends far noisier than SD's, else ''."""
    last = float(alphas_cumprod[-1])
    ratio = math.sqrt((1 - last) / last)
    if ratio <= 2 * SD_NOISE_RATIO:
        return ""
    t = len(alphas_cumprod) - 1
    return (
        f"\n(this model's ᾱ at t = {t} is {last:.1g}, so an estimate there multiplies an ε error by "
        f"{ratio:.0f}, against {SD_NOISE_RATIO} for SD's schedule: LCMScheduler's first steps draw noise. "
        "Start lower with --timesteps, as docs/training.md, 'Distillation', shows)"
    )


def closing_message(cfg, final: str | Path, distilled: bool, inpainting: bool, alphas_cumprod=None) -> str:
    """``final``'s files and how to use them: an ``sdlite generate`` line drawing the run's first
    validation prompt (or DreamBooth's instance prompt) with the model folder, the LoRA on its base, or
    for a new word, the call that adds it to the base's pipelines. A distillation's ``alphas_cumprod``
    (its scheduler's ᾱ_t) adds ``noisy_start``'s line."""
    if cfg.inverts:  # no model folder and no LoRA: the word's files, which the pipelines load
        files = ", ".join(sorted(p.name for p in Path(final).glob("*.safetensors")))
        return (
            f"saved {final}: {files}; pipe.load_textual_inversion(FILE) adds the word "
            f"{cfg.inversion.textual_inversion_token!r} to {cfg.model.pretrained}"
        )
    prompt = next(iter(cfg.validation.validation_prompts), cfg.dreambooth.instance_prompt or "a prompt")
    options = {}
    if distilled:  # a consistency model samples in a few LCMScheduler steps without guidance, adapter at 1
        options = {"sampler": ("--scheduler", "lcm", "--steps", "4", "--guidance", "1"), "scale": 1.0}
    if inpainting:  # a 9-channel U-Net runs in InpaintPipeline
        options = {"sampler": ("--image", "IN.png", "--mask", "MASK.png")}
    message = final_message(final, cfg.model.pretrained, prompt, cfg.adapters.lora, **options)
    return message + (noisy_start(alphas_cumprod) if distilled and alphas_cumprod is not None else "")
