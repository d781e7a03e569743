"""``sdlite evaluate``: a shapes model's prompt fidelity and diversity (read back from the pixels of
generated images) and the bits per dimension of held-out images (the variational bound, eq. 5 of
Ho et al. 2020). The diversity divides by the spread of the held-out data given (``--data``): a data
set whose captions name sizes more or less often than the generator's default is narrower or wider.
An SDXL folder is evaluated with TextToImageXLPipeline, its bits per dimension conditioned as it was
trained (both encoders, the pooled embedding and the size conditions: sdlite.likelihood). Beside
the VAE's PSNR, its round trip read strictly: the share of held-out images that the model's VAE encodes
and decodes back to the same colour, shape and box, read by sdlite.shape_reading (a rounded square is
a defect there), and the strict figure of the generated images."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdlite import fidelity, likelihood, shape_reading
from sdlite.cli import DEFAULT_STEPS, EVAL_GUIDANCE, EVAL_GUIDANCE_INTERVAL
from sdlite.data.dataset import ImageTransform, caption_text, image_bytes, load_rows
from sdlite.data.shapes import allowed_pairs, draw, sample_specs
from sdlite.images import grid
from training.cmd_generate import load_loras, load_pipeline, set_scheduler
from training.train_vae import psnr

# Held-out images read for the diversity's reference: a spread from n images is about 1/sqrt(2n) off.
REFERENCE_COUNT = 2048
# Held-out images read through the VAE: one wrong in 256 moves the share 0.4 points.
ROUND_TRIP_COUNT = 256


def evaluation_prompts(colours: list[str] | None, shapes: list[str] | None) -> list[str]:
    return [f"a {c} {s}" for c, s in allowed_pairs(colours, shapes)]


def run_evaluation(
    model: str,
    n: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = EVAL_GUIDANCE,
    guidance_interval: tuple[float, float] | None = EVAL_GUIDANCE_INTERVAL,
    seed: int = 0,
    colours: list[str] | None = None,
    shapes: list[str] | None = None,
    unseen: list[str] = (),
    data: str | None = None,
    bpd_count: int = 256,
    stride: int = 10,
    bpd_draws: int = 3,
    grid_path: str | Path | None = None,
    model_config: str = "sd15",
    scheduler: str = "ddpm",
    loras: list[tuple[str, float | None]] = (),
    round_trip: bool = True,
    timesteps: list[int] | None = None,
) -> dict:
    """Fidelity and diversity of generated images, bits per dimension of held-out latents; printed
    and returned as a dict; ``round_trip``: with the VAE's round trip read strictly (the demo reads it
    at its VAE stage)."""
    steps = len(timesteps) if timesteps else steps  # a custom schedule sets the step count
    pipe = load_pipeline(model, model_config)
    load_loras(pipe, [(path, 1.0 if scale is None else scale) for path, scale in loras])  # an LCM-LoRA, say
    bound_scheduler = pipe.scheduler  # the bound is the model's own diffusion's, whatever samples
    set_scheduler(pipe, scheduler)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = evaluation_prompts(colours, shapes)
    # Held-out data: its first bpd_count images for bits/dim; with a data folder, all of them (up to
    # REFERENCE_COUNT) for the spread its captions describe, which the diversity is measured against.
    count = max(bpd_count, ROUND_TRIP_COUNT, REFERENCE_COUNT if data else 0)
    held_out, captions = held_out_data(data, count, size, seed)
    reference = None
    if data:
        pixels = held_out.permute(0, 2, 3, 1).add(1).div(2).numpy()  # (N, size, size, 3) in [0, 1]
        reference = fidelity.data_reference(list(pixels), captions)
    start = time.perf_counter()
    generate = fidelity.pipeline_generate(
        pipe, steps, guidance, guidance_interval=guidance_interval, timesteps=timesteps
    )
    report = fidelity.prompt_fidelity(
        generate, prompts, n=n, seed=seed, image_size=size, unseen=unseen, keep_images=grid_path is not None,
        reference=reference,
    )  # fmt: skip
    fidelity_s = time.perf_counter() - start
    print(report.table())
    where = f" at t in {list(guidance_interval)}" if guidance_interval is not None else ""
    at = f" at t {','.join(map(str, timesteps))}" if timesteps is not None else ""
    setting = f"{steps} steps of {scheduler}{at}, guidance {guidance}{where}"
    print(f"({len(prompts)} prompts x {n} images, {setting}: {fidelity_s:.0f} s)")
    axes = ", ".join(f"{k} {v:.2f}" for k, v in report.diversity_by_axis.items())
    print(
        f"(diversity by axis: {axes}; over all the data's spread, whatever the caption: "
        f"{report.diversity_all_data:.2f}; the data: {report.reference})"
    )
    if grid_path is not None:
        images = [im for _, batch in report.images for im in batch]
        # Prompts run colour-major, so with one row per colour a row holds its shapes side by side.
        rows = len({c for c, _ in allowed_pairs(colours, shapes)})
        grid(images, rows=rows, scale=2).save(grid_path)
        print(f"wrote {grid_path}: a row per colour, {n} images per prompt, pixels doubled")

    pipe.scheduler = bound_scheduler
    trip = round_trip_figures(pipe.vae, held_out[:ROUND_TRIP_COUNT]) if round_trip else {}

    start = time.perf_counter()
    bound = likelihood.variational_bound(
        pipe, held_out[:bpd_count], captions[:bpd_count], stride=stride, seed=seed, draws=bpd_draws
    )
    bpd_s = time.perf_counter() - start
    print(f"held-out {bound.line()} ({bpd_s:.0f} s)")
    return {
        "fidelity": report.fidelity,
        "fidelity_seen": report.fidelity_of(seen=True),
        "fidelity_unseen": report.fidelity_of(seen=False),
        "fidelity_strict": report.fidelity_strict,
        "diversity": report.diversity,
        "diversity_all_data": report.diversity_all_data,
        "diversity_by_axis": report.diversity_by_axis,
        "diversity_reference": report.reference,
        "per_prompt": {s.prompt: s.correct for s in report.scores},
        **trip,
        "bpd": bound.bpd,
        "bpd_spread": bound.spread,
        "bound": vars(bound),
        "steps": steps,
        "timesteps": timesteps,
        "scheduler": scheduler,
        "guidance": guidance,
        "guidance_interval": list(guidance_interval) if guidance_interval is not None else None,
        "n": n,
        "seconds": {"fidelity": fidelity_s, "bpd": bpd_s},
    }


def round_trip_figures(vae, images: torch.Tensor) -> dict:
    """The VAE's PSNR and its round trip read strictly on held-out images (N, 3, H, W) in [-1, 1],
    printed and returned."""
    start = time.perf_counter()
    originals = list(images.permute(0, 2, 3, 1).add(1).mul(127.5).round().byte().numpy())
    copies = shape_reading.vae_round_trip(vae, images)
    trip = shape_reading.round_trip_reading(originals, copies)
    decibels = psnr(vae, images)  # of the float reconstructions, as train-vae reports it
    print(f"VAE: held-out PSNR {decibels:.2f} dB; {trip.line()} ({time.perf_counter() - start:.0f} s)")
    return {
        "vae_round_trip": trip.fraction,
        "vae_round_trip_by_shape": {s: a / max(t, 1) for s, (a, t) in trip.by_shape.items()},
        "vae_round_trip_images": trip.total,
        "vae_round_trip_psnr": decibels,
    }


def held_out_data(source: str | None, count: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(images (N, 3, size, size) in [-1, 1], captions): the first ``count`` rows of a data source
    (an image folder with metadata.jsonl, as train.py reads), or shapes drawn from a seed of their own."""
    if source:
        rows = load_rows(source)
        rows = rows.select(range(min(count, len(rows))))
        transform = ImageTransform(size)
        images = torch.stack([transform(image_bytes(row["image"]), i) for i, row in enumerate(rows)])
        return images, [caption_text(row["text"]) for row in rows]
    specs = sample_specs(count, seed=[seed, 1_000_003], image_size=size)  # a stream no data set draws from
    pixels = torch.from_numpy(np.stack([draw(s, size) for s in specs]))  # (N, size, size, 3) uint8
    return pixels.permute(0, 3, 1, 2).float() / 127.5 - 1, [s.caption for s in specs]


def run(args: argparse.Namespace) -> int:
    results = run_evaluation(
        args.model,
        n=args.n,
        steps=args.steps,
        guidance=args.guidance,
        guidance_interval=args.guidance_interval,
        timesteps=args.timesteps,
        seed=args.seed,
        colours=args.colours,
        shapes=args.shapes,
        unseen=args.unseen,
        data=args.data,
        bpd_count=args.bpd_count,
        bpd_draws=args.bpd_draws,
        stride=args.stride,
        grid_path=args.grid,
        model_config=args.model_config,
        scheduler=args.scheduler,
        loras=args.lora,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0
