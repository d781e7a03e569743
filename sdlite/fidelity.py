"""Prompt fidelity and diversity of a text-to-image model on the shapes data, read from the pixels.

Generate ``n`` images per prompt ("a red circle") and read the colour and shape back from the pixels:
segment the shape from the background, name its colour by the palette colour nearest the foreground's
median, name its shape by which template (circle, square, triangle drawn in the shape's bounding box)
overlaps it most. Beside it a **diversity** figure: the spread (standard deviation) of the shape's
position and size over a prompt's images, over the same spread in the data that the prompt describes
(the images whose caption names the same size, or none), so 1.0 means "as varied as the data" and a
model that draws one picture per prompt scores near 0. Beside the fidelity its **strict** figure:
the images that also read clean by ``sdlite.shape_reading.read_strictly`` (a rounded square, a blunt
triangle or an off-palette colour is a defect there). Deterministic for a seed.

This module imports no pipeline: ``prompt_fidelity`` takes a ``generate(prompts, seed)`` callable,
and ``pipeline_generate`` wraps any object called like ``TextToImagePipeline``. The likelihood of
held-out data (bits per dimension) is ``sdlite.likelihood``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from sdlite.data.shapes import SHAPES, SIZE_WORDS, half_range, parse_pair, shape_mask
from sdlite.images import to_uint8
from sdlite.shape_reading import MIN_AREA, Reading, foreground, nearest_colour, read_strictly

GenerateFn = Callable[[Sequence[str], int], Sequence]  # (prompts, seed) -> one image per prompt
GENERATOR_DATA = "the shapes generator's default data"  # the diversity's reference without a data set


# ---------------------------------------------------------------------------------------------------
# Reading an image
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Analysis:
    """What the pixels of one image show."""

    colour: str | None  # nearest palette colour of the shape's median, None when there is no shape
    shape: str | None  # best-matching template, None when there is no shape
    cx: float = math.nan  # bounding-box centre, pixels
    cy: float = math.nan
    half: float = math.nan  # half the longer side of the bounding box, pixels
    area: int = 0  # pixels of the shape
    match: float = 0.0  # intersection over union of the shape and its best template


def analyse_image(image) -> Analysis:
    """Colour, shape, position and size of the one shape in an image."""
    image = to_uint8(image)
    mask = foreground(image)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Analysis(None, None, area=area)
    colour, _ = nearest_colour(image, mask)
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)  # (x0, y0, x1, y1), pixel edges

    def iou(shape: str) -> float:
        template = shape_mask(shape, box, mask.shape)
        return float((template & mask).sum() / max((template | mask).sum(), 1))

    scores = {shape: iou(shape) for shape in SHAPES}
    shape = max(scores, key=scores.get)
    return Analysis(
        colour=colour,
        shape=shape,
        cx=(box[0] + box[2]) / 2,
        cy=(box[1] + box[3]) / 2,
        half=max(box[2] - box[0], box[3] - box[1]) / 2,
        area=area,
        match=scores[shape],
    )


def matches(prompt: str, analysis: Analysis, image_size: int) -> bool:
    """Whether an image's analysis shows what the prompt asks: its colour, shape and (when the prompt
    names one) size word."""
    colour, shape = parse_pair(prompt)
    if (colour and analysis.colour != colour) or (shape and analysis.shape != shape):
        return False
    words = prompt.lower().split()
    if "small" in words or "large" in words:
        lo, hi = half_range(image_size)
        measured = "small" if analysis.half <= (lo + hi) / 2 else "large"
        return measured in words
    return True


def strictly(prompt: str, analysis: Analysis, reading: Reading, image_size: int) -> bool:
    """Whether an image shows what the prompt asks (``matches``) and reads as it clean, strictly."""
    same = (reading.colour, reading.shape) == (analysis.colour, analysis.shape)
    return matches(prompt, analysis, image_size) and reading.clean and same


# ---------------------------------------------------------------------------------------------------
# Prompt fidelity and diversity
# ---------------------------------------------------------------------------------------------------


def spread(analyses: Sequence[Analysis]) -> np.ndarray:
    """Standard deviation of (cx, cy, half) over the analyses that found a shape."""
    found = np.array([(a.cx, a.cy, a.half) for a in analyses if a.shape is not None])
    if len(found) < 2:
        return np.zeros(3)
    return found.std(axis=0, ddof=1)  # ddof=1: unbiased, so few images compare fairly with many


@dataclass
class PromptScore:
    prompt: str
    correct: float  # fraction of images whose colour and shape (and size word) match the prompt
    colour: float  # fraction with the right colour
    shape: float  # fraction with the right shape
    diversity: float  # mean over (x, y, size) of their spread over that of the data the prompt describes
    seen: bool = True  # False for a pair left out of the training data
    diversity_all_data: float = 0.0  # the same over the spread of all the data, whatever the caption
    by_axis: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x, y and size apart: which one guidance narrows
    strict: float = 0.0  # fraction correct that also read clean strictly (sdlite.shape_reading)


@dataclass
class FidelityReport:
    scores: list[PromptScore]
    images: list = field(default_factory=list, repr=False)  # (prompt, [images]) for a grid
    reference: str = GENERATOR_DATA  # what the diversity was measured against

    @property
    def fidelity(self) -> float:
        return float(np.mean([s.correct for s in self.scores]))

    @property
    def fidelity_strict(self) -> float:
        return float(np.mean([s.strict for s in self.scores]))

    @property
    def diversity(self) -> float:
        return float(np.mean([s.diversity for s in self.scores]))

    @property
    def diversity_all_data(self) -> float:
        return float(np.mean([s.diversity_all_data for s in self.scores]))

    @property
    def diversity_by_axis(self) -> dict[str, float]:
        """The diversity of x, y and size apart, each averaged over the prompts. Classifier-free guidance
        at w samples ∝ p(x|c)·p(c|x)^(w-1): where a caption implies a size (no size word: mostly the
        middle ones), guidance narrows the sizes more than the places."""
        mean = np.mean([s.by_axis for s in self.scores], axis=0)
        return dict(zip(("x", "y", "size"), (float(v) for v in mean)))

    def fidelity_of(self, seen: bool) -> float | None:
        picked = [s.correct for s in self.scores if s.seen == seen]
        return float(np.mean(picked)) if picked else None

    def table(self) -> str:
        lines = [f"{'prompt':<28} {'correct':>8} {'colour':>7} {'shape':>6} {'diversity':>9} {'strict':>7}"]
        for s in self.scores:
            note = "" if s.seen else "  (never seen in training)"
            lines.append(
                f"{s.prompt:<28} {s.correct:>8.0%} {s.colour:>7.0%} {s.shape:>6.0%} {s.diversity:>9.2f} "
                f"{s.strict:>7.0%}{note}"
            )
        overall = f"{self.fidelity:>8.1%} {'':>7} {'':>6} {self.diversity:>9.2f} {self.fidelity_strict:>7.1%}"
        lines.append(f"{'overall':<28} {overall}")
        unseen = self.fidelity_of(seen=False)
        if unseen is not None:
            lines.append(f"{'pairs seen in training':<28} {self.fidelity_of(seen=True):>8.1%}")
            lines.append(f"{'pairs never seen':<28} {unseen:>8.1%}")
        return "\n".join(lines)


def data_spread(image_size: int = 32, count: int = 512, seed: int = 0, size: str | None = None) -> np.ndarray:
    """Spread of (cx, cy, half) over the generator's shapes data (its default rate of size words) whose
    caption names ``size`` ("small", "large", or None: no size, as "a red circle"), measured by the same
    analysis as the model's. That is what a prompt stands for: the data's "a red circle" images are the
    mid-sized ones and half of the small and large ones, so a model that draws every size for it is not
    the data's."""
    from sdlite.data.shapes import draw, sample_specs

    specs = [s for s in sample_specs(count * 6, seed, image_size) if s.size_word == size][:count]
    return spread([analyse_image(draw(s, image_size)) for s in specs])


def data_spread_all(image_size: int = 32, count: int = 512, seed: int = 0) -> np.ndarray:
    """Spread of (cx, cy, half) over all the shapes data, whatever the caption: the reference of the
    diversity figure before it compared a prompt with its own captions (kept to compare with it)."""
    from sdlite.data.shapes import draw, sample_specs

    return spread([analyse_image(draw(s, image_size)) for s in sample_specs(count, seed, image_size)])


@dataclass(frozen=True)
class Reference:
    """What the diversity divides by: the spread of (cx, cy, half) in the data each size word (or none)
    describes, and over all of it. A size word missing from ``by_size`` falls back to the generator's."""

    by_size: dict[str | None, np.ndarray]
    all_data: np.ndarray | None = None
    source: str = GENERATOR_DATA


# Fewer images than this with one size word give too loose a spread (about 1/sqrt(2n) off).
MIN_REFERENCE = 32


def data_reference(images: Sequence, captions: Sequence[str]) -> Reference:
    """The spreads of a data set's own images, grouped by the size word their caption names. A data set
    whose captions name sizes more often than the generator's default has narrower "a red circle"
    images (the mid sizes and fewer of the rest), so a model faithful to it is judged against it."""
    analyses = [analyse_image(image) for image in images]
    sizes = [prompt_size(caption) for caption in captions]
    by_size, counts, few = {}, [], []
    for size in (None, *SIZE_WORDS):
        group = [a for a, s in zip(analyses, sizes) if s == size]
        counts.append(f"{size or 'no size word'} {len(group)}")
        if len(group) >= MIN_REFERENCE:
            by_size[size] = spread(group)
        else:
            few.append(size or "no size word")
    source = f"{len(analyses)} data images ({', '.join(counts)})"
    if few:  # too few to measure: those prompts are compared with the generator's default data
        source += f"; under {MIN_REFERENCE}, so the generator's for: {', '.join(few)}"
    return Reference(by_size, spread(analyses), source)


def prompt_size(prompt: str) -> str | None:
    """The size word a prompt names ("a small red circle" -> "small"), or None."""
    words = [w for w in prompt.lower().split() if w in SIZE_WORDS]
    return words[0] if words else None


def prompt_fidelity(
    generate: GenerateFn,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    image_size: int = 32,
    unseen: Sequence[str] = (),
    keep_images: bool = False,
    reference: Reference | None = None,
) -> FidelityReport:
    """Generate ``n`` images for each prompt with ``generate(prompts, seed)`` and score them.

    ``generate`` is called once with every prompt repeated ``n`` times (prompt-major), so a caller
    can batch them; ``unseen`` names the prompts whose pair the model never saw in training. The
    diversity is against ``reference`` (``data_reference`` of the held-out data), else the generator's."""
    asked = [p for p in prompts for _ in range(n)]
    images = list(generate(asked, seed))
    if len(images) != len(asked):
        raise ValueError(f"generate returned {len(images)} images for {len(asked)} prompts")
    reference = reference or Reference({})
    references = {  # each size word's spread: the data's where it has one, else the generator's
        size: reference.by_size[size] if size in reference.by_size else data_spread(image_size, size=size)
        for size in {prompt_size(p) for p in prompts}
    }
    all_data = data_spread_all(image_size) if reference.all_data is None else reference.all_data
    unseen_pairs = {parse_pair(p) for p in unseen}
    scores, kept = [], []
    for i, prompt in enumerate(prompts):
        batch = images[i * n : (i + 1) * n]
        analyses = [analyse_image(im) for im in batch]
        read = [strictly(prompt, a, read_strictly(im), image_size) for a, im in zip(analyses, batch)]
        colour, shape = parse_pair(prompt)
        spreads = spread(analyses)  # (3,): x, y, size
        ratio = spreads / np.maximum(references[prompt_size(prompt)], 1e-6)
        scores.append(
            PromptScore(
                prompt=prompt,
                correct=float(np.mean([matches(prompt, a, image_size) for a in analyses])),
                colour=float(np.mean([a.colour == colour for a in analyses])) if colour else 1.0,
                shape=float(np.mean([a.shape == shape for a in analyses])) if shape else 1.0,
                diversity=float(np.mean(ratio)),
                diversity_all_data=float(np.mean(spreads / np.maximum(all_data, 1e-6))),
                seen=(colour, shape) not in unseen_pairs,
                by_axis=tuple(float(v) for v in ratio),
                strict=float(np.mean(read)),
            )
        )
        if keep_images:
            kept.append((prompt, batch))
    return FidelityReport(scores, kept, reference.source)


def pipeline_generate(
    pipe,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    batch_size: int = 64,
    guidance_interval: tuple[float, float] | None = None,
    timesteps: list[int] | None = None,
) -> GenerateFn:
    """A ``generate(prompts, seed)`` over any pipeline called like ``TextToImagePipeline`` (``timesteps``:
    a custom schedule in place of ``num_inference_steps``)."""

    def generate(prompts: Sequence[str], seed: int) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, len(prompts), batch_size):
            out = pipe(
                list(prompts[start : start + batch_size]),
                num_inference_steps=num_inference_steps,
                timesteps=timesteps,
                guidance_scale=guidance_scale,
                guidance_interval=guidance_interval,
                generator=generator,
                output_type="np",
            )
            images.extend(np.asarray(out.images))
        return images

    return generate
