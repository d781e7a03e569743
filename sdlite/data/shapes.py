"""The shapes data set: one coloured shape on a plain background, captioned with its colour and shape.

    a red circle          a small blue square          a large yellow triangle

It is generated, so it needs no download, it is exactly reproducible from a seed, and a program can
check a generated image against its prompt (``sdlite.fidelity.analyse_image``). Shapes are drawn
as exact pixel masks (no anti-aliasing): a pixel is inside when its centre is, so every pixel is
either the background or the shape's colour.

Leaving colour-shape pairs out (``exclude=["red circle"]``) makes a test of composition: a model
that never saw a red circle but saw red things and circles can still be asked for one.

The folder written by ``write_dataset`` is an image folder with ``metadata.jsonl`` lines of
``{"file_name": "000000.png", "text": "a red circle"}``, the layout ``training/train.py`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# The primaries and secondaries of RGB, toned down to stand off the white background: at least 120
# apart (blue-cyan), so that a blurred or slightly wrong colour still has one nearest name. (A purple
# was tried: a small model drew it and blue alike.)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 210),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SIZE_WORDS: tuple[str, ...] = ("small", "large")
# Half the side of a shape's box, as a fraction of the image side: 5 to 11 px on a 32 px image
# (smaller shapes, 2 latent pixels wide at f=4, are too few pixels to tell a circle from a square).
MIN_HALF, MAX_HALF = 0.15, 0.34


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: a shape of one colour in a square box centred at (cx, cy)."""

    colour: str
    shape: str
    cx: int  # box centre, pixels from the left
    cy: int  # box centre, pixels from the top
    half: int  # half the box's side, pixels
    size_word: str | None  # "small", "large" or None when the caption leaves the size out

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.cx - self.half, self.cy - self.half, self.cx + self.half, self.cy + self.half)

    @property
    def caption(self) -> str:
        words = [self.size_word] if self.size_word else []
        return " ".join(["a", *words, self.colour, self.shape])


def half_range(image_size: int) -> tuple[int, int]:
    """Smallest and largest half-side a shape has in images of ``image_size`` pixels."""
    return max(2, round(MIN_HALF * image_size)), max(3, round(MAX_HALF * image_size))


def size_word(half: int, image_size: int) -> str | None:
    """'small' for the lower third of the size range, 'large' for the upper third, None between:
    a caption names a size only where a reader of the pixels cannot mistake it."""
    lo, hi = half_range(image_size)
    third = (hi - lo) / 3
    if half < lo + third:
        return "small"
    if half > hi - third:
        return "large"
    return None


# ---------------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------------


def shape_mask(shape: str, box: Sequence[float], size: int | tuple[int, int]) -> np.ndarray:
    """(H, W) bool mask of ``shape`` filling ``box`` = (x0, y0, x1, y1): pixel i is inside when its
    centre (i + 0.5) is. A circle is the ellipse in the box, a triangle points up with its base on the
    box's bottom edge."""
    h, w = (size, size) if isinstance(size, int) else size
    x0, y0, x1, y1 = (float(v) for v in box)
    y, x = np.mgrid[0:h, 0:w] + 0.5  # pixel centres, (H, W) each
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    if shape == "square":
        return (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
    if shape == "circle":
        return ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 <= 1.0
    if shape == "triangle":
        depth = (y - y0) / (2 * ry)  # 0 at the apex, 1 at the base
        return (depth >= 0) & (depth <= 1) & (np.abs(x - cx) <= depth * rx)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def draw(spec: ShapeSpec, image_size: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 image of one spec: the shape's colour inside its mask, background outside."""
    image = np.empty((image_size, image_size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    image[shape_mask(spec.shape, spec.box, image_size)] = PALETTE[spec.colour]
    return image


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def parse_pair(text: str) -> tuple[str | None, str | None]:
    """'red circle' -> ('red', 'circle'); 'red' -> ('red', None); 'circle' -> (None, 'circle')."""
    colour = shape = None
    for word in text.lower().replace(",", " ").split():
        if word in PALETTE:
            colour = word
        elif word in SHAPES or word[:-1] in SHAPES:  # "circle" or "circles"
            shape = word if word in SHAPES else word[:-1]
        elif word not in ("a", "an") and word not in SIZE_WORDS:
            raise ValueError(f"{text!r}: {word!r} is neither a colour {tuple(PALETTE)} nor a shape {SHAPES}")
    if colour is None and shape is None:
        raise ValueError(f"{text!r} names no colour and no shape")
    return colour, shape


def allowed_pairs(
    colours: Iterable[str] | None = None,
    shapes: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
) -> list[tuple[str, str]]:
    """The (colour, shape) pairs left after ``exclude``: each entry a pair ('red circle'), a colour
    ('red': every red shape) or a shape ('circle': every circle)."""
    colours = list(colours) if colours else list(PALETTE)
    shapes = list(shapes) if shapes else list(SHAPES)
    for c in colours:
        if c not in PALETTE:
            raise ValueError(f"unknown colour {c!r}; choose from {tuple(PALETTE)}")
    for s in shapes:
        if s not in SHAPES:
            raise ValueError(f"unknown shape {s!r}; choose from {SHAPES}")
    rules = [parse_pair(e) for e in exclude]

    def excluded(c: str, s: str) -> bool:
        return any((rc is None or rc == c) and (rs is None or rs == s) for rc, rs in rules)

    pairs = [(c, s) for c in colours for s in shapes if not excluded(c, s)]
    if not pairs:
        raise ValueError("no colour-shape pair is left to draw: the exclusions remove them all")
    return pairs


def sample_specs(
    count: int,
    seed: int | Sequence[int] = 0,
    image_size: int = 32,
    colours: Iterable[str] | None = None,
    shapes: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    size_word_prob: float = 0.5,
) -> list[ShapeSpec]:
    """``count`` random specs, the same for the same arguments. The pair is uniform over the allowed
    pairs, the size and position uniform over what fits; the caption names a clearly small or large
    size with probability ``size_word_prob``, so that "a red circle" stands for red circles of every
    size."""
    pairs = allowed_pairs(colours, shapes, exclude)
    rng = np.random.default_rng(seed)
    lo, hi = half_range(image_size)
    specs = []
    for _ in range(count):
        colour, shape = pairs[rng.integers(len(pairs))]
        half = int(rng.integers(lo, hi + 1))
        cx, cy = (int(v) for v in rng.integers(half, image_size - half + 1, size=2))
        word = size_word(half, image_size) if rng.random() < size_word_prob else None
        specs.append(ShapeSpec(colour, shape, cx, cy, half, word))
    return specs


def render(specs: Iterable[ShapeSpec], image_size: int = 32) -> list[Image.Image]:
    return [Image.fromarray(draw(s, image_size)) for s in specs]


# ---------------------------------------------------------------------------------------------------
# Writing a folder
# ---------------------------------------------------------------------------------------------------


def _write_folder(folder: Path, specs: list[ShapeSpec], image_size: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, spec in enumerate(specs):
        name = f"{i:06d}.png"
        Image.fromarray(draw(spec, image_size)).save(folder / name)
        lines.append(json.dumps({"file_name": name, "text": spec.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    # What each image shows, for analysis; train.py reads only metadata.jsonl.
    (folder / "specs.jsonl").write_text("\n".join(json.dumps(asdict(s)) for s in specs) + "\n")


def write_dataset(
    out: str | Path,
    count: int = 2000,
    seed: int = 0,
    image_size: int = 32,
    colours: Iterable[str] | None = None,
    shapes: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    size_word_prob: float = 0.5,
    holdout: int = 0,
) -> Path:
    """Write ``count`` images and ``metadata.jsonl`` to ``out``. With ``holdout`` > 0 the folder gets
    ``train/`` (``count`` images) and ``test/`` (``holdout`` more, drawn from the same distribution
    with a different stream of the same seed), the split layout of an image folder."""
    out = Path(out)
    kw = dict(
        image_size=image_size,
        colours=colours,
        shapes=shapes,
        exclude=list(exclude),
        size_word_prob=size_word_prob,
    )
    specs = sample_specs(count, seed=seed, **kw)
    if holdout <= 0:
        _write_folder(out, specs, image_size)
        return out
    _write_folder(out / "train", specs, image_size)
    # Seeding with [seed, 1] gives a stream independent of the training images' (seeded by seed).
    _write_folder(out / "test", sample_specs(holdout, seed=[seed, 1], **kw), image_size)
    return out


def read_specs(folder: str | Path) -> list[ShapeSpec]:
    """The specs a folder written by ``write_dataset`` records, in file order."""
    lines = Path(folder, "specs.jsonl").read_text().splitlines()
    return [ShapeSpec(**json.loads(line)) for line in lines if line.strip()]
