"""Measure a text-to-image model: does it draw what it is asked, how varied, how likely are the data.

Two measurements, both deterministic for a seed:

1. **Prompt fidelity on the shapes data.** Generate ``n`` images per prompt ("a red circle") and read
   the colour and shape back from the pixels: segment the shape from the background, name its colour
   by the palette colour nearest the foreground's median, name its shape by which template (circle,
   square, triangle drawn in the shape's bounding box) overlaps it most. Beside it a **diversity**
   figure: the spread (standard deviation) of the shape's position and size over a prompt's images,
   over the same spread in the data, so 1.0 means "as varied as the data" and a model that draws one
   picture per prompt scores near 0.
2. **Bits per dimension** of held-out latents under the diffusion model: the variational bound
   L_T + sum_{t>1} L_{t-1} + L_0 of Ho et al. 2020 eq. 5, from the scheduler's terms, divided by
   D * ln 2; reported beside the plain eps-MSE training loss on the same latents. Latents are
   continuous, so this bounds a differential entropy: lower is better, it can go below zero, and it
   compares models that share a VAE, not with the bits per pixel of image models.

This module imports no pipeline: ``prompt_fidelity`` takes a ``generate(prompts, seed)`` callable,
and ``pipeline_generate`` wraps any object called like ``TextToImagePipeline``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from sdlite.data.shapes import PALETTE, SHAPES, half_range, parse_pair, shape_mask
from sdlite.ddpm import bits_per_dim
from sdlite.tokenizer import token_ids

# A pixel belongs to the shape when its colour is this far (RGB Euclidean, 0..441) from the
# background's: about half the distance of the palette colour nearest to the background (yellow, 219).
FOREGROUND_DISTANCE = 100.0
# Below this many pixels there is no shape to name (the smallest one in the data has about 50).
MIN_AREA = 6

GenerateFn = Callable[[Sequence[str], int], Sequence]  # (prompts, seed) -> one image per prompt


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


def to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a PIL image, a uint8 array or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return array


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


def foreground(image: np.ndarray) -> np.ndarray:
    """(H, W) bool mask of the shape: the largest region that differs from the background, whose
    colour is the median of the image's border."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float64)
    background = np.median(border, axis=0)
    distance = np.linalg.norm(image.astype(np.float64) - background, axis=-1)
    return largest_component(distance > FOREGROUND_DISTANCE)


def analyse_image(image) -> Analysis:
    """Colour, shape, position and size of the one shape in an image."""
    image = to_uint8(image)
    mask = foreground(image)
    area = int(mask.sum())
    if area < MIN_AREA:
        return Analysis(None, None, area=area)
    median = np.median(image[mask].astype(np.float64), axis=0)
    colour = min(PALETTE, key=lambda c: float(np.sum((median - PALETTE[c]) ** 2)))
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
    diversity: float  # mean over (x, y, size) of their spread over the data's spread
    seen: bool = True  # False for a pair left out of the training data


@dataclass
class FidelityReport:
    scores: list[PromptScore]
    images: list = field(default_factory=list, repr=False)  # (prompt, [images]) for a grid

    @property
    def fidelity(self) -> float:
        return float(np.mean([s.correct for s in self.scores]))

    @property
    def diversity(self) -> float:
        return float(np.mean([s.diversity for s in self.scores]))

    def fidelity_of(self, seen: bool) -> float | None:
        picked = [s.correct for s in self.scores if s.seen == seen]
        return float(np.mean(picked)) if picked else None

    def table(self) -> str:
        lines = [f"{'prompt':<28} {'correct':>8} {'colour':>7} {'shape':>6} {'diversity':>9}"]
        for s in self.scores:
            note = "" if s.seen else "  (never seen in training)"
            lines.append(
                f"{s.prompt:<28} {s.correct:>8.0%} {s.colour:>7.0%} {s.shape:>6.0%} {s.diversity:>9.2f}{note}"
            )
        lines.append(f"{'overall':<28} {self.fidelity:>8.1%} {'':>7} {'':>6} {self.diversity:>9.2f}")
        unseen = self.fidelity_of(seen=False)
        if unseen is not None:
            lines.append(f"{'pairs seen in training':<28} {self.fidelity_of(seen=True):>8.1%}")
            lines.append(f"{'pairs never seen':<28} {unseen:>8.1%}")
        return "\n".join(lines)


def data_spread(image_size: int = 32, count: int = 512, seed: int = 0) -> np.ndarray:
    """Spread of (cx, cy, half) over shapes data, measured by the same analysis as the model's."""
    from sdlite.data.shapes import draw, sample_specs

    analyses = [analyse_image(draw(s, image_size)) for s in sample_specs(count, seed, image_size)]
    return spread(analyses)


def prompt_fidelity(
    generate: GenerateFn,
    prompts: Sequence[str],
    n: int = 8,
    seed: int = 0,
    image_size: int = 32,
    unseen: Sequence[str] = (),
    keep_images: bool = False,
) -> FidelityReport:
    """Generate ``n`` images for each prompt with ``generate(prompts, seed)`` and score them.

    ``generate`` is called once with every prompt repeated ``n`` times (prompt-major), so a caller
    can batch them; ``unseen`` names the prompts whose pair the model never saw in training."""
    asked = [p for p in prompts for _ in range(n)]
    images = list(generate(asked, seed))
    if len(images) != len(asked):
        raise ValueError(f"generate returned {len(images)} images for {len(asked)} prompts")
    reference = data_spread(image_size)
    unseen_pairs = {parse_pair(p) for p in unseen}
    scores, kept = [], []
    for i, prompt in enumerate(prompts):
        batch = images[i * n : (i + 1) * n]
        analyses = [analyse_image(im) for im in batch]
        colour, shape = parse_pair(prompt)
        scores.append(
            PromptScore(
                prompt=prompt,
                correct=float(np.mean([matches(prompt, a, image_size) for a in analyses])),
                colour=float(np.mean([a.colour == colour for a in analyses])) if colour else 1.0,
                shape=float(np.mean([a.shape == shape for a in analyses])) if shape else 1.0,
                diversity=float(np.mean(spread(analyses) / np.maximum(reference, 1e-6))),
                seen=(colour, shape) not in unseen_pairs,
            )
        )
        if keep_images:
            kept.append((prompt, batch))
    return FidelityReport(scores, kept)


def pipeline_generate(
    pipe, num_inference_steps: int = 50, guidance_scale: float = 7.5, batch_size: int = 64
) -> GenerateFn:
    """A ``generate(prompts, seed)`` over any pipeline called like ``TextToImagePipeline``."""

    def generate(prompts: Sequence[str], seed: int) -> list[np.ndarray]:
        generator = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, len(prompts), batch_size):
            out = pipe(
                list(prompts[start : start + batch_size]),
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type="np",
            )
            images.extend(np.asarray(out.images))
        return images

    return generate


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


# ---------------------------------------------------------------------------------------------------
# Bits per dimension
# ---------------------------------------------------------------------------------------------------


@dataclass
class BoundReport:
    """The variational bound (eq. 5) of held-out latents, mean over them, in bits per dimension."""

    bpd: float  # L_T + Σ_{t>1} L_{t-1} + L_0
    prior: float  # L_T
    diffusion: float  # Σ_{t>1} L_{t-1}
    decoder: float  # L_0
    eps_mse: float  # the training loss ||ε - ε_θ(x_t, t, c)||², t ~ U{0..T-1}, on the same latents
    count: int  # latents measured
    stride: int  # 1: every term summed; k: every k-th term of the tail (random offset), times k

    def line(self) -> str:
        return (
            f"bits/dim {self.bpd:.3f} (L_T {self.prior:.4f} + Σ L_t-1 {self.diffusion:.3f} + "
            f"L_0 {self.decoder:.3f}; stride {self.stride}, {self.count} latents); "
            f"eps-MSE {self.eps_mse:.4f}"
        )


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: Sequence[str]) -> torch.Tensor:
    """(N, tokens, width) CLIP embeddings of texts padded to the tokenizer's length."""
    return text_encoder(token_ids(tokenizer, texts).to(text_encoder.device))[0]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents z ~ q(z|x) of images in [-1, 1], times the VAE's scaling_factor."""
    z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample(generator)
    return z * vae.config.scaling_factor


def bound_timesteps(
    T: int, stride: int = 10, dense_below: int = 20, offset: int = 0
) -> list[tuple[int, int]]:
    """(t, weight) of the eq. 5 terms to compute: t = 0 (L_0) and every t < dense_below with weight 1,
    then every ``stride``-th t from ``dense_below + offset`` with weight ``stride``.

    The terms of the first few steps are most of the sum (for a trained tiny model, t < 20 gives
    about 85% of Σ L_{t-1}), so they are all computed and only the long, small tail is sampled. With
    ``offset`` uniform over 0..stride-1 each tail term is kept with probability 1/stride: unbiased.
    """
    if stride < 1 or not 0 <= offset < stride:
        raise ValueError(f"need stride >= 1 and 0 <= offset < stride, got stride={stride}, offset={offset}")
    dense = [(t, 1) for t in range(min(dense_below, T))]
    return dense + [(t, stride) for t in range(max(dense_below, 1) + offset, T, stride)]


@torch.no_grad()
def variational_bound(
    parts,
    images: torch.Tensor,
    captions: Sequence[str],
    stride: int = 10,
    dense_below: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    offset: int | None = None,
) -> BoundReport:
    """Bits per dimension of the images' latents given their captions, under the diffusion model.

    ``parts`` holds vae, tokenizer, text_encoder, unet and scheduler (a pipeline or
    ``sdlite.models.Components``); ``images`` is (N, 3, H, W) in [-1, 1]. Each term is the
    scheduler's ``vb_term`` at one draw of x_t ~ q(x_t | x_0), as in its ``calc_bpd_loop``, over the
    timesteps of ``bound_timesteps`` (``offset`` None: drawn from ``seed``). The same model calls
    give the eps-MSE training loss, E_t ||ε - ε_θ(x_t, t, c)||², weighted alike.

    The bound is of continuous latents, a differential entropy: comparable between models of the
    same latents (the same VAE), not with bits per pixel of images, and negative for a sharp model.
    """
    scheduler, unet = parts.scheduler, parts.unet
    T = scheduler.config.num_train_timesteps
    generator = torch.Generator().manual_seed(seed)
    if offset is None:
        offset = int(torch.randint(stride, (1,), generator=generator))
    steps = bound_timesteps(T, stride, dense_below, offset)
    prior, decoder, diffusion, mse = (torch.zeros(0) for _ in range(4))
    for start in range(0, len(images), batch_size):
        x0 = encode_images(parts.vae, images[start : start + batch_size], generator).float()
        context = encode_text(parts.tokenizer, parts.text_encoder, captions[start : start + batch_size])
        B = len(x0)
        terms, errors = torch.zeros(B), torch.zeros(B)
        for t_int, weight in steps:
            t = torch.full((B,), t_int, dtype=torch.long)
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = scheduler.q_sample(x0, t, noise)
            eps = unet(x_t.to(unet.dtype), t.to(unet.device), encoder_hidden_states=context).sample.float()
            bits = bits_per_dim(scheduler.vb_term(eps, x0, x_t, t))  # (B,)
            if t_int == 0:
                decoder = torch.cat([decoder, bits])
            else:
                terms += weight * bits
            errors += weight * ((eps - noise) ** 2).mean((1, 2, 3))
        prior = torch.cat([prior, bits_per_dim(scheduler.prior_kl(x0))])
        diffusion = torch.cat([diffusion, terms])
        mse = torch.cat([mse, errors / sum(w for _, w in steps)])
    prior, decoder, diffusion = prior.mean().item(), decoder.mean().item(), diffusion.mean().item()
    return BoundReport(
        bpd=prior + diffusion + decoder,
        prior=prior,
        diffusion=diffusion,
        decoder=decoder,
        eps_mse=mse.mean().item(),
        count=len(images),
        stride=stride,
    )
