"""Images as arrays and grids: what the trainer's samples, the CLI's outputs and evaluation share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PIL import Image


def to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


def grid(images: Sequence, rows: int, scale: int = 1) -> Image.Image:
    """One image of ``images`` laid out row-major in ``rows`` rows, each pixel ``scale`` x ``scale``."""
    arrays = [to_uint8(im) for im in images]
    h, w, _ = arrays[0].shape
    cols = math.ceil(len(arrays) / rows)
    canvas = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, a in enumerate(arrays):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = a
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)  # nearest neighbour: pixels stay sharp
    return Image.fromarray(canvas)
