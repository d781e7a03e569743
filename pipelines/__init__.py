"""Pipelines built on sdlite's parts: text to image. Installed as ``sdlite.pipelines``."""

from sdlite.pipelines.text_to_image import TextToImagePipeline
from sdlite.pipelines.text_to_image_xl import TextToImageXLPipeline

__all__ = ["TextToImagePipeline", "TextToImageXLPipeline"]
