"""What the end of a U-Net run prints: the files it wrote and a ready-to-paste line that uses them."""

from __future__ import annotations

from pathlib import Path

from sdlite.cli import final_message


def closing_message(cfg, final: str | Path, distilled: bool, inpainting: bool) -> str:
    """``final``'s files and how to use them: an ``sdlite generate`` line drawing the run's first
    validation prompt (or DreamBooth's instance prompt) with the model folder, the LoRA on its base, or
    for a new word, the call that adds it to the base's pipelines."""
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
    return final_message(final, cfg.model.pretrained, prompt, cfg.adapters.lora, **options)
