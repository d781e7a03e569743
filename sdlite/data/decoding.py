"""Encoded image bytes -> the RGB image a person sees, within a pixel limit.

What a viewer shows, so what the model should learn: the EXIF orientation applied (a phone's portrait
photo is stored sideways with a tag that says so), 16-bit images scaled to 8 bits rather than clipped,
transparent pixels white rather than whatever colour they hide.

A small file can declare a huge image (a 329 KB 16-bit PNG of 13000 x 13000 pixels decodes to 338 MB,
and took 4.6 GB through float64 copies), so the size is read from the header and checked against a
limit relative to the training resolution before any pixel is decoded (``pixel_limit``), and the
conversions work in place in 32-bit integers. A thin strip of a few pixels is small as a file and huge
once its short side is scaled up to the resolution, so its aspect ratio is bounded too (``check_aspect``).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlite.data.files import DataError

# The version of decode_image, part of every cache key of decoded pixels; bump it when decoding changes.
# 2: 16-bit images scaled rather than clipped, transparent pixels white rather than their hidden colour.
# 3: EXIF orientation applied.
DECODER = 3

# pixel_limit: images may have this many times the pixels of the training square (8x its side each
# way), and at least FLOOR_PIXELS (4096 x 4096: a 12-megapixel phone photo passes at any resolution).
PIXELS_PER_TRAINING_PIXEL = 64
FLOOR_PIXELS = 4096 * 4096
# The most extreme aspect ratio trained (long side over short side): scaled to the training side, an
# image within it holds at most PIXELS_PER_TRAINING_PIXEL x resolution² pixels; no photograph comes near.
MAX_ASPECT = PIXELS_PER_TRAINING_PIXEL
ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image a quarter, swapping width and height


class TooManyPixels(DataError):
    """An image whose header declares more pixels than the limit: refused before decoding."""


def pixel_limit(resolution: int, max_pixels: int | None = None) -> int:
    """The most pixels an image may declare for training at ``resolution``; ``max_pixels`` overrides."""
    if max_pixels is not None:
        return max_pixels
    return max(PIXELS_PER_TRAINING_PIXEL * resolution * resolution, FLOOR_PIXELS)


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # a broken EXIF block: PIL raises several kinds; the pixels may still be fine
        return 1


def _open(data: bytes) -> Image.Image:
    with warnings.catch_warnings():  # PIL's own warning at 89 MP: the limit here is ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image of ``data`` with its header read and nothing decoded; TooManyPixels past the limit."""
    image = _open(data)
    w, h = image.size
    if w * h > max_pixels:
        raise TooManyPixels(
            f"too many pixels ({w}x{h} = {w * h}, over the limit of {max_pixels}; "
            "raise it with max_image_pixels if the image is real)"
        )
    return image


def check_aspect(size: tuple[int, int]) -> None:
    """TooManyPixels for an image of ``size`` (w, h) more than MAX_ASPECT times longer than wide.

    The limit on the file's own pixels does not bound what it is scaled to: a 1 x 10000 strip of a few
    hundred bytes, its short side scaled up to 512, is 512 x 5,120,000 pixels. Within MAX_ASPECT the
    scaled image holds at most MAX_ASPECT x resolution² pixels, inside pixel_limit; past it, what a
    square or bucket crop keeps is a sliver at any resolution. Checked before any resize."""
    w, h = size
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise TooManyPixels(
            f"aspect ratio too extreme ({w}x{h}, more than {MAX_ASPECT}:1): scaled to the training "
            "resolution it would fill the memory, and a crop of it shows a sliver; crop it to a less "
            "extreme shape"
        )


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) as shown, from the header (and EXIF orientation), without decoding the pixels."""
    image = _open(data)
    w, h = image.size
    return (h, w) if _orientation(image) in (5, 6, 7, 8) else (w, h)


# The raw layout of PIL's integer modes (np.asarray would copy them twice).
DTYPES = {"I": "=i4", "I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2", "I;16N": "=u2"}


def _to_8_bits(values: np.ndarray) -> np.ndarray:
    """round(v / 257) of 16-bit values (0..65535 -> 0..255; 257 = 65535 / 255) as uint8, in integers,
    about 64k pixels at a time: no copy of the whole image but its uint8 result."""
    out = np.empty(values.shape, np.uint8)
    rows = max(1, 2**16 // max(values.shape[1], 1))
    for start in range(0, len(values), rows):
        block = values[start : start + rows].astype(np.int64)  # "I" images hold int32: clip first
        np.clip(block, 0, 65535, out=block)
        out[start : start + rows] = (block + 128) // 257
    return out


def decode_image(data: bytes, max_pixels: int = FLOOR_PIXELS) -> Image.Image:
    """Encoded bytes -> an RGB image, every pixel decoded (a truncated file fails here), oriented as
    its EXIF says; TooManyPixels, before decoding, for an image of more than ``max_pixels``."""
    image = open_image(data, max_pixels)
    image.load()
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit grayscale PNG or TIFF
        values = np.frombuffer(image.tobytes(), DTYPES[image.mode]).reshape(image.height, image.width)
        image = Image.fromarray(_to_8_bits(values))
    elif image.mode == "F":  # floating-point TIFF: taken as [0, 1]
        values = np.asarray(image, dtype=np.float32) * np.float32(255)
        np.clip(np.round(values, out=values), 0, 255, out=values)
        image = Image.fromarray(values.astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        image = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    return image.convert("RGB")


def why_unusable(error: Exception) -> str:
    """What a report says of an image that failed to read or decode with ``error``."""
    if isinstance(error, FileNotFoundError):
        return "missing file"
    if isinstance(error, DataError):  # too many pixels, not a regular file, too many bytes
        return str(error)
    if isinstance(error, Image.DecompressionBombError):
        return "too many pixels (decompression bomb?)"
    if isinstance(error, UnidentifiedImageError):
        return "not an image (in no format PIL reads)"
    return f"unreadable image ({type(error).__name__}: {str(error)[:80]})"
