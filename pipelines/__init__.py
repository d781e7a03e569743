"""Pipelines built on sdlite's parts: text to image (SD 1.x, 2.x and SDXL), installed as sdlite.pipelines."""

from sdlite.pipelines.inputs import Limits
from sdlite.pipelines.sampling import NonFiniteSampleError
from sdlite.pipelines.text_to_image import TextToImagePipeline
from sdlite.pipelines.text_to_image_xl import TextToImageXLPipeline

__all__ = ["Limits", "NonFiniteSampleError", "TextToImagePipeline", "TextToImageXLPipeline"]
