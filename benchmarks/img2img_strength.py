"""Image to image and inpainting on the demo's model, read back with `sdlite evaluate`'s reader.

    python benchmarks/img2img_strength.py [--model /work/demo/model] [--data /work/demo/data/test]
        [--inpaint_models /work/demo/model runs/demo-inpaint/final] [--n 64] [--seeds 0 1] [--threads 1]
        [--skip img2img|inpaint]

1. Image to image toward another colour: each held-out image (a shape on white) redrawn with its own
   caption but another colour ("a yellow square" for a red square), at strength 0.02, 0.05, 0.1,
   0.2, ..., 1.0.
   sdlite/fidelity.py's reader names the shape, its colour and its box in the input and the output:
   the fraction that keeps the shape and its position (centre within POSITION_TOLERANCE px of the
   input's), the fraction that takes the new colour, and both.
2. Inpainting a shape into an empty region: a BOX x BOX square of each held-out image holding no
   shape pixel (the first n images that have one) is masked, and "a small <colour> <shape>" (another
   colour than the image's shape) painted there at strength 1. The reader, run on the masked square
   alone, names the colour and shape drawn there (fidelity as text to image's, whose figure for the
   same prompts over the whole image stands beside it). Outside the mask, the mean absolute pixel
   change from the input against the VAE's own round trip (decode(encode(x)), the same sampled
   latents) on the same pixels, and the same two away from the mask's edge (beyond one latent, the
   VAE's factor in pixels). Twice: the square beside the image's own shape, and the same square of the
   image with its shape removed (background only: the shapes data's plain BACKGROUND).
3. The same for the shape's own box (grown by 2 px; then also out to the latent grid) masked and
   another colour and shape painted in its place, read in the whole image.

Inpainting runs on each of --inpaint_models: ordinary U-Nets (4 channels) and inpainting ones (9, e.g.
configs/demo-inpaint.yaml's), whose text to image is their own: the whole image masked.
Sampling as `sdlite evaluate`'s: 50 DDPM steps, guidance 2 for t <= 300. Deterministic for its seeds.
What it measured, with the machine and date: benchmarks/RESULTS.md, "Image to image and inpainting".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import ImageToImagePipeline, InpaintPipeline, TextToImagePipeline  # noqa: E402
from sdlite.cli import DEFAULT_STEPS, EVAL_GUIDANCE, EVAL_GUIDANCE_INTERVAL  # noqa: E402
from sdlite.data.shapes import BACKGROUND, PALETTE, SHAPES  # noqa: E402
from sdlite.fidelity import analyse_image, foreground  # noqa: E402

STRENGTHS = [0.02, 0.05] + [round(0.1 * k, 1) for k in range(1, 11)]  # 1 and 2 of 50 steps first
POSITION_TOLERANCE = 2.0  # pixels of the box centre, of 32: a shape moved by less reads as kept
BOX = 16  # side of the inpainting mask, pixels: room for a "small" shape (half-side 5-6)
COLOURS = list(PALETTE)


def other_colour(colour: str) -> str:
    """The palette colour three places on: red <-> yellow, green <-> magenta, blue <-> cyan."""
    return COLOURS[(COLOURS.index(colour) + 3) % len(COLOURS)]


def held_out(folder: Path, n: int) -> list[tuple[np.ndarray, str]]:
    """The first n (image, caption) pairs of a shapes folder's metadata.jsonl."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()[:n]]
    return [(np.asarray(Image.open(folder / r["file_name"]).convert("RGB")), r["text"]) for r in rows]


def call_kwargs(seed: int) -> dict:
    return dict(
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=EVAL_GUIDANCE,
        guidance_interval=EVAL_GUIDANCE_INTERVAL,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )


# ---- 1. image to image toward another colour ------------------------------------------------------


def strength_curve(pipe, items, seeds: list[int]) -> list[dict]:
    """Per strength: the fractions of outputs that keep shape and position, take the new colour, both."""
    inputs = [analyse_image(image) for image, _ in items]
    prompts = [caption.replace(a.colour, other_colour(a.colour)) for (_, caption), a in zip(items, inputs)]
    images = [Image.fromarray(image) for image, _ in items]
    rows = []
    for strength in STRENGTHS:
        kept, coloured, both = [], [], []
        for seed in seeds:
            out = pipe(prompts, image=images, strength=strength, **call_kwargs(seed)).images
            for before, after in zip(inputs, map(analyse_image, out)):
                keeps = (
                    after.shape == before.shape
                    and max(abs(after.cx - before.cx), abs(after.cy - before.cy)) <= POSITION_TOLERANCE
                )
                takes = after.colour == other_colour(before.colour)
                kept.append(keeps), coloured.append(takes), both.append(keeps and takes)
        rows.append(
            dict(strength=strength, kept=np.mean(kept), new_colour=np.mean(coloured), both=np.mean(both))
        )
        print(f"strength {strength:.2f}: keeps shape and position {rows[-1]['kept']:.1%}, new colour "
              f"{rows[-1]['new_colour']:.1%}, both {rows[-1]['both']:.1%}", flush=True)  # fmt: skip
    return rows


# ---- 2. inpainting -------------------------------------------------------------------------------


def empty_box(image: np.ndarray) -> tuple[int, int] | None:
    """(top, left) of the BOX x BOX square holding no shape pixel, one pixel clear of the shape,
    farthest from the shape's centre; None when there is none."""
    shape = foreground(image)
    ys, xs = np.nonzero(shape)
    cy, cx = ys.mean(), xs.mean()
    size = image.shape[0]
    free = [
        (top, left)
        for top in range(size - BOX + 1)
        for left in range(size - BOX + 1)
        if not shape[max(top - 1, 0) : top + BOX + 1, max(left - 1, 0) : left + BOX + 1].any()
    ]
    far = lambda p: (p[0] + BOX / 2 - cy) ** 2 + (p[1] + BOX / 2 - cx) ** 2  # noqa: E731
    return max(free, key=far) if free else None


def empty_region_cases(items, n: int) -> list[tuple[np.ndarray, np.ndarray, str, tuple]]:
    """(image, mask, prompt, square read) for the first n images with an empty BOX square: "a small
    <another colour> <shape>" painted there, read in the square alone."""
    cases = []
    for image, _ in items:
        box = empty_box(image)
        if box is None:
            continue
        mask = np.zeros(image.shape[:2], dtype=bool)
        mask[box[0] : box[0] + BOX, box[1] : box[1] + BOX] = True
        prompt = f"a small {other_colour(analyse_image(image).colour)} {SHAPES[len(cases) % len(SHAPES)]}"
        cases.append((image, mask, prompt, (*box, BOX)))
    return cases[:n]


def background_only(cases) -> list[tuple[np.ndarray, np.ndarray, str, tuple]]:
    """The same cases on an empty image: each image's shape removed, the background alone left."""
    return [(np.full_like(image, BACKGROUND), *rest) for image, *rest in cases]


def own_region_cases(items, n: int, grid: int = 1) -> list[tuple[np.ndarray, np.ndarray, str, None]]:
    """(image, mask, prompt, None) for the first n images: the shape's box grown by 2 px (then out to
    multiples of ``grid`` px) masked, and another colour and shape painted in its place, read in the
    whole image (its only shape)."""
    cases = []
    for image, caption in items[:n]:
        a = analyse_image(image)
        mask = np.zeros(image.shape[:2], dtype=bool)
        r = int(np.ceil(a.half)) + 2
        top, left = max(int(a.cy) - r, 0) // grid * grid, max(int(a.cx) - r, 0) // grid * grid
        bottom, right = -(-(int(a.cy) + r + 1) // grid) * grid, -(-(int(a.cx) + r + 1) // grid) * grid
        mask[top:bottom, left:right] = True
        shape = SHAPES[(SHAPES.index(a.shape) + 1) % len(SHAPES)]
        cases.append(
            (image, mask, caption.replace(a.colour, other_colour(a.colour)).replace(a.shape, shape), None)
        )
    return cases


def inpainting(pipe, cases, seeds: list[int]) -> dict:
    """Fidelity where the mask was painted, text to image's for the same prompts, the change outside."""
    masks = np.stack([mask for _, mask, _, _ in cases])
    prompts = [prompt for _, _, prompt, _ in cases]
    images = [Image.fromarray(image) for image, *_ in cases]
    mask_images = [Image.fromarray(mask.astype(np.uint8) * 255) for mask in masks]
    originals = np.stack([image for image, *_ in cases]).astype(np.float64)
    away = ~np.stack([_dilate(m, pipe.vae_scale_factor) for m in masks])  # beyond one latent of the mask
    t2i = text_to_image(pipe)
    found = {k: [] for k in ("colour", "shape", "both", "t2i", "out", "vae", "out_away", "vae_away")}
    for seed in seeds:
        out = pipe(prompts, image=images, mask_image=mask_images, strength=1.0, **call_kwargs(seed)).images
        for drawn, (_, _, prompt, square) in zip(out, cases):
            if square is not None:
                top, left, side = square
                drawn = drawn[top : top + side, left : left + side]
            a, (colour, shape) = analyse_image(drawn), prompt.split()[-2:]
            found["colour"].append(a.colour == colour), found["shape"].append(a.shape == shape)
            found["both"].append(a.colour == colour and a.shape == shape)
        drawn = np.clip(np.round(out * 255), 0, 255)
        round_trip = np.clip(np.round(vae_round_trip(pipe, images, seed) * 255), 0, 255)
        for name, x in (("out", drawn), ("vae", round_trip)):
            change = np.abs(x - originals).mean(axis=-1)  # (N, H, W), 0-255
            found[name].append(change[~masks].mean())
            found[name + "_away"].append(change[away].mean())
        for image, prompt in zip(t2i(prompts, seed), prompts):
            a, (colour, shape) = analyse_image(image), prompt.split()[-2:]
            found["t2i"].append(a.colour == colour and a.shape == shape)
    result = {name: float(np.mean(v)) for name, v in found.items()}
    result["cases"] = len(cases)
    print(json.dumps(result), flush=True)
    return result


def text_to_image(pipe):
    """The model's text to image, prompts, seed -> images: an ordinary U-Net's pipeline, or an inpainting
    U-Net's with the whole image masked (the masked image then all zeros, as it was trained)."""
    if pipe.unet.config.in_channels == 4:
        t2i = TextToImagePipeline(**{k: v for k, v in pipe.components.items() if k in _T2I_PARTS})
        t2i.set_progress_bar_config(disable=True)
        return lambda prompts, seed: t2i(prompts, **call_kwargs(seed)).images
    size = pipe.resolve_size(None, None)
    white = Image.new("RGB", size[::-1], BACKGROUND)
    whole = lambda n: dict(image=[white] * n, mask_image=[white] * n, strength=1.0)  # noqa: E731
    return lambda prompts, seed: pipe(prompts, **whole(len(prompts)), **call_kwargs(seed)).images


_T2I_PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """The mask grown by r pixels along both axes (a square neighbourhood)."""
    padded = np.pad(mask, r)
    size = mask.shape[0]
    return np.stack(
        [padded[dy : dy + size, dx : dx + size] for dy in range(2 * r + 1) for dx in range(2 * r + 1)]
    ).any(0)


@torch.no_grad()
def vae_round_trip(pipe, images, seed: int) -> np.ndarray:
    """decode(encode(x)) as the pipeline makes them: latents drawn from the posterior, then decoded."""
    pixels = pipe.image_processor.preprocess(images).to(torch.float32)
    latents = pipe.encode_image(pixels, torch.Generator().manual_seed(seed))
    return np.asarray(pipe.decode_latents(latents, "np"), dtype=np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/work/demo/model")
    parser.add_argument("--data", default="/work/demo/data/test")
    parser.add_argument("--inpaint_models", nargs="+", default=None, help="inpainting's models; --model's")
    parser.add_argument("--n", type=int, default=64, help="held-out images")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", choices=["img2img", "inpaint"], default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    items = held_out(Path(args.data), args.n)
    img2img = ImageToImagePipeline.from_pretrained(args.model)
    img2img.set_progress_bar_config(disable=True)
    began = time.perf_counter()
    if args.skip != "img2img":
        strength_curve(img2img, items, args.seeds)
        print(f"image to image: {time.perf_counter() - began:.0f} s", flush=True)
    if args.skip != "inpaint":
        empty = empty_region_cases(held_out(Path(args.data), 10**6), args.n)
        for model in args.inpaint_models or [args.model]:
            began = time.perf_counter()
            inpaint = InpaintPipeline.from_pretrained(model)
            inpaint.set_progress_bar_config(disable=True)
            print(f"{model} (U-Net of {inpaint.unet.config.in_channels} input channels)", flush=True)
            print("an empty square of an empty image (the shape removed):", flush=True)
            inpainting(inpaint, background_only(empty), args.seeds)
            print("an empty square beside the image's shape:", flush=True)
            inpainting(inpaint, empty, args.seeds)
            print("the shape's own box:", flush=True)
            inpainting(inpaint, own_region_cases(items, args.n), args.seeds)
            print("the shape's own box, out to the latent grid:", flush=True)
            inpainting(inpaint, own_region_cases(items, args.n, inpaint.vae_scale_factor), args.seeds)
            print(f"inpainting: {time.perf_counter() - began:.0f} s", flush=True)


if __name__ == "__main__":
    main()
