"""sdlite: a small latent Stable Diffusion library. The public API, importable from here:

    from sdlite import TextToImagePipeline, DDPMScheduler
    pipe = TextToImagePipeline.from_pretrained("runs/tiny-shapes/final")

Each name is imported on first use (PEP 562), so ``import sdlite`` stays cheap and the library's own
modules, which the pipelines import, never import the pipelines back at import time.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "DDPMScheduler": "sdlite.ddpm",
    "PRESETS": "sdlite.presets",
    "Preset": "sdlite.presets",
    "PresetXL": "sdlite.presets",
    "get_preset": "sdlite.presets",
    "LoraSettings": "sdlite.lora",
    "add_lora": "sdlite.lora",
    "save_lora": "sdlite.lora",
    "load_lora_into": "sdlite.lora",
    "convert_lora_file": "sdlite.kohya",
    "TextToImagePipeline": "pipelines.text_to_image",
    "TextToImageXLPipeline": "pipelines.text_to_image_xl",
    "ImageToImagePipeline": "pipelines.image_to_image",
    "ImageToImageXLPipeline": "pipelines.image_to_image_xl",
    "InpaintPipeline": "pipelines.inpaint",
    "InpaintXLPipeline": "pipelines.inpaint_xl",
    "Limits": "pipelines.inputs",
    "NonFiniteSampleError": "pipelines.sampling",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
