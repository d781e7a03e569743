"""Pipelines built on sdlite's parts: text to image, image to image and inpainting (SD 1.x, 2.x and SDXL)."""

from pipelines.image_to_image import ImageToImagePipeline
from pipelines.image_to_image_xl import ImageToImageXLPipeline
from pipelines.inpaint import InpaintPipeline
from pipelines.inpaint_xl import InpaintXLPipeline
from pipelines.inputs import Limits
from pipelines.sampling import NonFiniteSampleError
from pipelines.text_to_image import TextToImagePipeline
from pipelines.text_to_image_xl import TextToImageXLPipeline

__all__ = [
    "ImageToImagePipeline",
    "ImageToImageXLPipeline",
    "InpaintPipeline",
    "InpaintXLPipeline",
    "Limits",
    "NonFiniteSampleError",
    "TextToImagePipeline",
    "TextToImageXLPipeline",
]
