"""Pipelines built on sdlite's parts: text to image. Installed as ``sdlite.pipelines``."""

from sdlite.pipelines.inputs import Limits
from sdlite.pipelines.sampling import NonFiniteSampleError
from sdlite.pipelines.text_to_image import TextToImagePipeline

__all__ = ["Limits", "NonFiniteSampleError", "TextToImagePipeline"]
