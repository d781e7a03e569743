"""Third-party log lines that tell an sdlite user nothing, dropped by their text, in our commands only.

Each entry names the logger a line comes from and what its message says; every other line of that
logger (and every other logger) is kept. ``quiet_third_party()`` is called by each entry point before
diffusers or transformers is imported (transformers writes its torchvision notes at import), and imports
neither itself: the ``sdlite`` parser stays fast.

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...". The
  fallback is the PIL processor, which is all an image prompt needs; sdlite does not depend on torchvision.
- diffusers: "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder' ... open an
  issue": said whenever a LoRA adapts the U-Net alone, which is what most LoRAs (ours too) do.
- accelerate: "The following values were not passed to `accelerate launch` and had defaults used
  instead" when no accelerate config exists and the defaults are one process on one machine, full
  precision, no compilation: what a run on a CPU or one GPU wants. Kept when it chose several processes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

DEFAULTED = re.compile(r"`--(\w+)` was set to (?:a value of )?`([^`]*)`")
SINGLE_PROCESS = {  # accelerate's defaults that change nothing for a one-process run
    "num_processes": {"1"},
    "num_machines": {"1"},
    "mixed_precision": {"'no'"},
    "dynamo_backend": {"'no'"},
}


def _torchvision_note(message: str) -> bool:
    return "requires torchvision (not installed); falling back to" in message


def _no_text_encoder_lora(message: str) -> bool:
    return message.startswith("No LoRA keys associated to") and "prefix='text_encoder" in message


def _single_process_defaults(message: str) -> bool:
    if not message.startswith("The following values were not passed to `accelerate launch`"):
        return False
    settings = DEFAULTED.findall(message)
    # The CPU thread count accelerate picks is one per physical core: what sdlite picks too.
    return all(
        name == "num_cpu_threads_per_process" or value in SINGLE_PROCESS.get(name, ())
        for name, value in settings
    )


NOISE: dict[str, Callable[[str], bool]] = {
    "transformers.utils.import_utils": _torchvision_note,
    "diffusers.loaders.lora_base": _no_text_encoder_lora,
    "diffusers.loaders.peft": _no_text_encoder_lora,
    "accelerate.commands.launch": _single_process_defaults,
}


class DropNoise(logging.Filter):
    """A logger's filter that drops the records whose message ``is_noise`` says tells our user nothing."""

    def __init__(self, is_noise: Callable[[str], bool]):
        super().__init__()
        self.is_noise = is_noise

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.is_noise(record.getMessage())


def quiet_third_party() -> None:
    """Drop the lines of ``NOISE`` from here on, in this process; calling it again adds nothing."""
    for name, is_noise in NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropNoise) for f in logger.filters):
            logger.addFilter(DropNoise(is_noise))
