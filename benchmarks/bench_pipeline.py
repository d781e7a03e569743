"""Seconds per image: sdlite's TextToImagePipeline against diffusers' StableDiffusionPipeline.

Both pipelines share the same weights (random, from a preset), scheduler config, steps, prompt and
seed; repetitions alternate between them after a warm-up, so drift in the machine's speed hits both
alike. Reported: the median seconds per image of each and the ratio ours / diffusers (below 1 is
faster), then the scheduler's own cost per step (``scheduler.step`` alone on the same latents).

    python benchmarks/bench_pipeline.py                      # tiny and small presets
    python benchmarks/bench_pipeline.py --presets tiny --steps 50 --repeats 10
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import diffusers
import numpy as np
import torch
import transformers
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import StableDiffusionPipeline

from pipelines import TextToImagePipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components

PROMPT = "a red circle on a blue background"


def scheduler_config(parts) -> dict:
    # steps_offset=1 because diffusers' SD pipeline rewrites any other value to 1 when it is built;
    # underscored keys dropped because from_config would reset the keys they list to defaults.
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    return config | {"steps_offset": 1}


def make_pipelines(preset: str):
    parts = build_components(preset, seed=0)
    models = {k: v for k, v in parts.as_dict().items() if k != "scheduler"}
    config = scheduler_config(parts)
    pipes = {
        "sdlite": TextToImagePipeline(**models, scheduler=DDPMScheduler.from_config(config)),
        "diffusers": StableDiffusionPipeline(
            **models,
            scheduler=DiffusersDDPM.from_config(config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        ),
        # Ours with diffusers' scheduler: tells the pipeline's share of a difference from the scheduler's.
        "sdlite+diffusers-ddpm": TextToImagePipeline(**models, scheduler=DiffusersDDPM.from_config(config)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def generate(pipe, steps: int, images: int):
    return pipe(
        PROMPT,
        num_inference_steps=steps,
        num_images_per_prompt=images,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images


def bench_pipelines(preset: str, steps: int, images: int, repeats: int, warmup: int) -> dict:
    pipes = make_pipelines(preset)
    outputs = {name: generate(pipe, steps, images) for name, pipe in pipes.items()}
    diff = float(np.abs(outputs["sdlite"] - outputs["diffusers"]).max())
    for _ in range(warmup - 1):
        for pipe in pipes.values():
            generate(pipe, steps, images)
    wall = {name: [] for name in pipes}
    cpu = {name: [] for name in pipes}
    names = list(pipes)
    for rep in range(repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:  # rotate who goes first
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            generate(pipes[name], steps, images)
            wall[name].append((time.perf_counter() - start_wall) / images)
            cpu[name].append((time.process_time() - start_cpu) / images)
    return {
        "wall": {name: statistics.median(t) for name, t in wall.items()},
        "cpu": {name: statistics.median(t) for name, t in cpu.items()},
        "cpu_min": {name: min(t) for name, t in cpu.items()},
        "spread": {name: (min(t), max(t)) for name, t in wall.items()},
        "max_abs_diff": diff,
    }


def bench_scheduler_step(latent_shape, steps: int, repeats: int) -> dict[str, float]:
    """Microseconds per scheduler.step call, ours and diffusers', same config, latents and draws."""
    parts_config = scheduler_config(build_components("tiny", seed=0))
    schedulers = {"sdlite": DDPMScheduler(**parts_config), "diffusers": DiffusersDDPM(**parts_config)}
    sample = torch.randn(latent_shape, generator=torch.Generator().manual_seed(1))
    eps = torch.randn(latent_shape, generator=torch.Generator().manual_seed(2))
    for s in schedulers.values():
        s.set_timesteps(steps)
    per_step = {name: [] for name in schedulers}
    with torch.inference_mode():
        for rep in range(repeats + 2):
            for name, s in schedulers.items():
                g = torch.Generator().manual_seed(0)
                x = sample
                start = time.process_time()
                for t in s.timesteps:
                    x = s.step(eps, t, x, generator=g, return_dict=False)[0]
                if rep >= 2:  # two warm-up passes
                    per_step[name].append((time.process_time() - start) / len(s.timesteps) * 1e6)
    return {name: statistics.median(v) for name, v in per_step.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--small-steps", type=int, default=20, help="steps for presets other than tiny")
    parser.add_argument("--images", type=int, default=1, help="images per prompt (batch size)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}, {torch.get_num_threads()} threads"
    )
    print("guidance 7.5 (two U-Net passes per step), DDPM, output_type='np'; seconds per image, median")
    print(
        "wall: elapsed; cpu: this process's CPU time, steadier when others share the machine; min: best run"
    )
    for preset in args.presets:
        steps = args.steps if preset == "tiny" else args.small_steps
        r = bench_pipelines(preset, steps, args.images, args.repeats, args.warmup)
        wall, cpu, best = r["wall"], r["cpu"], r["cpu_min"]
        print(f"\n[{preset}] {steps} steps, {args.images} image(s)/call, {args.repeats} interleaved repeats")
        for name in wall:
            lo, hi = r["spread"][name]
            print(
                f"  {name:<22} wall {wall[name]:.4f} s/image (min {lo:.4f}, max {hi:.4f}), "
                f"cpu {cpu[name]:.4f} (min {best[name]:.4f})"
            )
        ratio = {k: v["sdlite"] / v["diffusers"] for k, v in (("wall", wall), ("cpu", cpu), ("best", best))}
        print(
            f"  ratio sdlite / diffusers: wall {ratio['wall']:.3f}, cpu {ratio['cpu']:.3f}, "
            f"cpu min {ratio['best']:.3f}"
        )
        print(f"  max |sdlite - diffusers| over the images: {r['max_abs_diff']:.2e}")

    print("\nscheduler.step alone, CPU microseconds per step (median of 20 passes over 50 timesteps)")
    for shape in ((1, 4, 8, 8), (2, 4, 64, 64)):
        us = bench_scheduler_step(shape, 50, 20)
        print(
            f"  latents {shape}: sdlite {us['sdlite']:.1f} us, diffusers {us['diffusers']:.1f} us, "
            f"ratio {us['sdlite'] / us['diffusers']:.3f}"
        )


if __name__ == "__main__":
    main()
