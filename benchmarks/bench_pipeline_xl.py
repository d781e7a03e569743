"""Seconds per image: sdlite's TextToImageXLPipeline against diffusers' StableDiffusionXLPipeline.

Both share the same weights (random, from an SDXL preset; tiny-sdxl by default), the same scheduler
(one config, each pipeline its own instance of sdlite's DDPM), steps, prompts and seed. After a
warm-up the repetitions alternate between them, rotating who goes first, so drift in the speed of a
shared machine hits both alike. Reported: median seconds per image (wall and this process's CPU
time), the min-max spread, the ratio ours / diffusers (below 1 is faster) and the largest pixel
difference between their images.

    python benchmarks/bench_pipeline_xl.py                          # tiny-sdxl, 30 steps, 1 thread
    python benchmarks/bench_pipeline_xl.py --steps 50 --repeats 10
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
from diffusers import StableDiffusionXLPipeline

from pipelines import TextToImageXLPipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models_xl import build_components_xl

PROMPTS = ["a red circle on a blue background", "a green square", "two yellow triangles"]


def make_pipelines(preset: str) -> dict:
    parts = build_components_xl(preset, seed=0)
    models = {k: v for k, v in parts.as_dict().items() if k != "scheduler"}
    config = dict(parts.scheduler.config)
    pipes = {
        "sdlite": TextToImageXLPipeline(**models, scheduler=DDPMScheduler.from_config(config)),
        "diffusers": StableDiffusionXLPipeline(
            **models, scheduler=DDPMScheduler.from_config(config), add_watermarker=False
        ),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return pipes


def generate(pipe, steps: int, guidance: float):
    return pipe(
        PROMPTS, num_inference_steps=steps, guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0), output_type="np",
    ).images  # fmt: skip


def bench(preset: str, steps: int, guidance: float, repeats: int, warmup: int) -> dict:
    pipes = make_pipelines(preset)
    outputs = {name: generate(pipe, steps, guidance) for name, pipe in pipes.items()}
    diff = float(np.abs(outputs["sdlite"] - outputs["diffusers"]).max())
    for _ in range(warmup - 1):
        for pipe in pipes.values():
            generate(pipe, steps, guidance)
    wall, cpu = {n: [] for n in pipes}, {n: [] for n in pipes}
    names = list(pipes)
    for rep in range(repeats):
        for name in names[rep % 2 :] + names[: rep % 2]:  # alternate who goes first
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            generate(pipes[name], steps, guidance)
            wall[name].append((time.perf_counter() - start_wall) / len(PROMPTS))
            cpu[name].append((time.process_time() - start_cpu) / len(PROMPTS))
    # Paired ratios (each repeat's ours / diffusers, run back to back) show the spread of the ratio itself.
    paired = [a / b for a, b in zip(cpu["sdlite"], cpu["diffusers"])]
    return {"wall": wall, "cpu": cpu, "paired": paired, "max_abs_diff": diff}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny-sdxl")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers "
        f"{transformers.__version__}, python {platform.python_version()}, {torch.get_num_threads()} thread(s)"
    )
    r = bench(args.preset, args.steps, args.guidance, args.repeats, args.warmup)
    print(
        f"[{args.preset}] {len(PROMPTS)} prompts/call, {args.steps} DDPM steps, guidance {args.guidance}, "
        f"{args.repeats} alternating repeats; seconds per image"
    )
    for name in r["wall"]:
        w, c = r["wall"][name], r["cpu"][name]
        print(f"  {name:<10} wall median {statistics.median(w):.4f} (min {min(w):.4f}, max {max(w):.4f}), "
              f"cpu median {statistics.median(c):.4f} (min {min(c):.4f}, max {max(c):.4f})")  # fmt: skip
    ratio = {
        k: statistics.median(r[k]["sdlite"]) / statistics.median(r[k]["diffusers"]) for k in ("wall", "cpu")
    }
    p = r["paired"]
    print(f"  ratio sdlite / diffusers: wall {ratio['wall']:.3f}, cpu {ratio['cpu']:.3f}; paired cpu ratios "
          f"median {statistics.median(p):.3f} (min {min(p):.3f}, max {max(p):.3f})")  # fmt: skip
    print(f"  max |sdlite - diffusers| over the images: {r['max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
