"""Reading one shape from the pixels of a shapes image: the lenient segmentation ``sdlite.fidelity``
names a colour and a shape with, and a **strict** reading that also says what is wrong with the shape.

The lenient reading (``sdlite.fidelity.analyse_image``) takes the pixels far from the background and
names the template that overlaps them most: a square with rounded corners still overlaps the square
best, so it reads as a square. The strict reading holds the shape to what makes it that shape:

- its colour: the median of the shape's pixels within ``COLOUR_TOLERANCE`` of a palette colour;
- its pixels: those nearer that colour than the background (half-way, so a blurred straight edge
  stays where it was, and a corner survives only while it is more shape than background);
- its outline: the best of the three templates, drawn in the box it fits best (from the pixels' own
  box, an edge moved a pixel at a time), overlaps it at ``MIN_MATCH`` or more, and no stray pixels
  lie outside it;
- its corners: a square's four corner pixels and a triangle's apex and base ends are shape. A corner
  rounded by 2 pixels or more loses its corner pixel (a pixel is inside when its centre is, as
  ``sdlite.data.shapes`` draws), so it reads as a defect; a circle is held to its outline alone.

Each failure is named in ``Reading.defects``; a reading with none is ``clean``. The generator's own
images read back clean (tests/test_fidelity.py). ``vae_round_trip`` reads held-out images through a
VAE (encode, decode) and counts those that come back as they went in.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sdlite.data.shapes import BACKGROUND, PALETTE, SHAPES, shape_mask
from sdlite.images import to_uint8

# A pixel belongs to the shape when its colour is this far (RGB Euclidean, 0..441) from the
# background's: about half the distance of the palette colour nearest to the background (yellow, 219).
FOREGROUND_DISTANCE = 100.0
# Below this many pixels there is no shape to name (the smallest one in the data has about 50).
MIN_AREA = 6

# Half the distance of the two nearest palette colours (blue and cyan, 120): a median this close to
# one colour is farther from every other.
COLOUR_TOLERANCE = 60.0
# The fitted template's intersection over union with the shape's pixels.
MIN_MATCH = 0.85
# Pixels nearer the shape's colour than the background, outside the shape's own region.
MAX_STRAY = 2

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), pixel edges


# ---------------------------------------------------------------------------------------------------
# Segmentation
# ---------------------------------------------------------------------------------------------------


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a (H, W) bool mask."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    best: list[tuple[int, int]] = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    out = np.zeros_like(mask)
    if best:
        out[tuple(np.array(best).T)] = True
    return out


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's border, (3,) float."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    return np.median(border, axis=0)


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of the shape: the largest region that differs from the background, whose
    colour is the median of the image's border."""
    distance = np.linalg.norm(image.astype(np.float64) - background_colour(image), axis=-1)
    return largest_component(distance > FOREGROUND_DISTANCE)


def nearest_colour(image: np.ndarray, mask: np.ndarray) -> tuple[str, float]:
    """The palette colour nearest the median of the masked pixels, and its distance from that median."""
    median = np.median(image[mask].astype(np.float64), axis=0)
    distances = {name: float(np.linalg.norm(median - rgb)) for name, rgb in PALETTE.items()}
    colour = min(distances, key=distances.get)
    return colour, distances[colour]


def nearer_than_background(image: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """(H, W) bool: pixels nearer ``colour`` than the shapes' background. |p - c| < |p - b| is the
    projection of p - b on c - b past half of c - b, so it reads coverage, whatever the colour's
    distance from the background."""
    b, c = np.asarray(BACKGROUND, np.float64), np.asarray(colour, np.float64)
    t = (image.astype(np.float64) - b) @ (c - b) / float((c - b) @ (c - b))
    return t > 0.5


# ---------------------------------------------------------------------------------------------------
# The strict reading
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What the pixels of one image show, read strictly."""

    colour: str | None  # nearest palette colour of the shape's median, None when there is no shape
    shape: str | None  # best-fitting template, None when there is no shape
    box: Box | None = None  # the box the template fits best in
    match: float = 0.0  # the fitted template's intersection over union with the shape's pixels
    defects: tuple[str, ...] = ()  # what keeps it from being that shape, exactly

    @property
    def clean(self) -> bool:
        return self.shape is not None and not self.defects

    def agrees_with(self, other: Reading, tolerance: int = 1) -> bool:
        """Both clean, the same colour and shape, each edge of the box within ``tolerance`` pixels."""
        if not (self.clean and other.clean) or (self.colour, self.shape) != (other.colour, other.shape):
            return False
        return all(abs(a - b) <= tolerance for a, b in zip(self.box, other.box))


def overlap(shape: str, box: Box, mask: np.ndarray) -> tuple[float, np.ndarray]:
    """(intersection over union, template) of ``shape`` drawn in ``box`` against ``mask``."""
    template = shape_mask(shape, box, mask.shape)
    return float((template & mask).sum() / max((template | mask).sum(), 1)), template


def fit(shape: str, mask: np.ndarray) -> tuple[float, Box, np.ndarray]:
    """(intersection over union, box, template) of ``shape`` in the box it fits best: from the mask's
    own box, an edge moved a pixel at a time while the overlap grows. A triangle drawn in a box leaves
    the box's top row empty (no pixel centre is inside its apex there), so its box is found one up."""
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    best, template = overlap(shape, box, mask)
    moved = True
    while moved:
        moved = False
        for edge, step in itertools.product(range(4), (-1, 1)):
            near = tuple(v + step * (i == edge) for i, v in enumerate(box))
            x0, y0, x1, y1 = near
            if not (0 <= x0 <= x1 - 2 and x1 <= w and 0 <= y0 <= y1 - 2 and y1 <= h):
                continue  # the data's boxes lie inside the image: outside, no pixel could tell
            iou, drawn = overlap(shape, near, mask)
            if iou > best:
                box, best, template, moved = near, iou, drawn, True
    return best, box, template


def corner_defects(shape: str, template: np.ndarray, mask: np.ndarray) -> list[str]:
    """The corners a square and a triangle are drawn with and the mask lacks: the ends of the
    template's first and last rows (for a triangle its apex and the ends of its base). A circle has
    none: its outline's overlap with the template is its tolerance."""
    if shape == "circle":
        return []
    rows = np.nonzero(template.any(axis=1))[0]
    missing = 0
    for row in (rows[0], rows[-1]):
        xs = np.nonzero(template[row])[0]
        missing += sum(not mask[row, x] for x in {int(xs[0]), int(xs[-1])})
    return [f"a {shape} with {missing} corner{'s' * (missing > 1)} missing"] if missing else []


def read_strictly(image) -> Reading:
    """Colour, shape and box of the one shape in an image, with what is wrong with it (see above)."""
    image = to_uint8(image)
    lenient = foreground(image)
    if lenient.sum() < MIN_AREA:
        return Reading(None, None, defects=("no shape",))
    colour, off = nearest_colour(image, lenient)
    defects = []
    if off > COLOUR_TOLERANCE:
        defects.append(f"colour {off:.0f} off {colour}")
    near = nearer_than_background(image, PALETTE[colour])
    mask = largest_component(near)
    if mask.sum() < MIN_AREA:
        return Reading(colour, None, defects=(*defects, "no shape nearer its colour than the background"))
    stray = int(near.sum() - mask.sum())
    if stray > MAX_STRAY:
        defects.append(f"{stray} stray pixels")
    fits = {shape: fit(shape, mask) for shape in SHAPES}
    shape = max(fits, key=lambda s: fits[s][0])
    match, box, template = fits[shape]
    if match < MIN_MATCH:
        defects.append(f"fits a {shape} at {match:.2f}")
    defects += corner_defects(shape, template, mask)
    return Reading(colour, shape, box, match, tuple(defects))


# ---------------------------------------------------------------------------------------------------
# A VAE's round trip
# ---------------------------------------------------------------------------------------------------


@dataclass
class RoundTrip:
    """How many held-out images a VAE gives back as they were read, strictly."""

    agreed: int  # reconstructions that read clean and as their original (colour, shape, box within 1 px)
    total: int  # originals that read clean (the others say nothing of the VAE)
    by_shape: dict[str, tuple[int, int]] = field(default_factory=dict)  # shape -> (agreed, total)
    defects: Counter = field(default_factory=Counter)  # what the reconstructions that failed show

    @property
    def fraction(self) -> float:
        return self.agreed / max(self.total, 1)

    def line(self) -> str:
        shapes = ", ".join(f"{s} {a / max(t, 1):.0%}" for s, (a, t) in sorted(self.by_shape.items()))
        return f"round trip read back strictly {self.fraction:.1%} of {self.total} ({shapes})"


def round_trip_reading(originals: Sequence, reconstructions: Sequence) -> RoundTrip:
    """Read each original and its reconstruction strictly and count the pairs that agree."""
    agreed, total, by_shape, defects = 0, 0, {}, Counter()
    for original, copy in zip(originals, reconstructions, strict=True):
        want = read_strictly(original)
        if not want.clean:
            continue
        got = read_strictly(copy)
        ok = got.agrees_with(want)
        agreed, total = agreed + ok, total + 1
        a, t = by_shape.get(want.shape, (0, 0))
        by_shape[want.shape] = (a + ok, t + 1)
        if not ok:
            moved = (got.colour, got.shape) == (want.colour, want.shape)
            defects.update(got.defects or ["box moved" if moved else f"read as a {got.colour} {got.shape}"])
    return RoundTrip(agreed, total, by_shape, defects)


@torch.no_grad()
def vae_round_trip(vae, images: torch.Tensor, batch_size: int = 128) -> list[np.ndarray]:
    """D(mean of q(z|x)) of (N, 3, H, W) images in [-1, 1], as (H, W, 3) uint8 arrays: the
    reconstruction the held-out PSNR measures."""
    out = []
    for batch in images.split(batch_size):
        x = batch.to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        out.extend(to_uint8(reconstruction.float().add(1).div(2).permute(0, 2, 3, 1).cpu().numpy()))
    return out
