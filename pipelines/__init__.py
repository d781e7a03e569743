"""Pipelines built on sdlite's parts: text to image."""

from pipelines.text_to_image import TextToImagePipeline

__all__ = ["TextToImagePipeline"]
