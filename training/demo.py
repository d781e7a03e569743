"""``sdlite demo``: the whole chain on the built-in shapes, each stage timed.

data (every colour-shape pair but one) -> VAE (PSNR and its round trip of the held-out images, read
strictly) -> U-Net and text encoder -> evaluation (fidelity on the pairs seen and on the one never
seen, diversity, bits/dim) -> out/samples.png and out/results.json.
Each trainer gets its config object, built from its YAML recipe in configs/ and the demo's paths.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from diffusers import AutoencoderKL

from sdlite.data.shapes import write_dataset
from training import train, train_vae
from training.checks import load_yaml
from training.cmd_evaluate import ROUND_TRIP_COUNT, held_out_data, round_trip_figures, run_evaluation
from training.config.keys import from_dict
from training.config.unet import TrainConfig
from training.config.vae import VAETrainConfig

# The demo's data: every colour-shape pair but one, which the model is then asked for.
DEMO_UNSEEN = ["red circle"]
DEMO_COUNT, DEMO_HOLDOUT = 2000, 256
# Held-out latents for bits/dim: a quarter of evaluate's default. The estimate moves more with the
# timesteps it samples than with the count (benchmarks/RESULTS.md), so evaluate's three draws of the
# terms on fewer latents, with their spread, say more than one draw on many.
DEMO_BPD_COUNT = 64
# --fast: a few steps of every stage, to test the chain (tests/test_demo.py), not to learn anything.
FAST = dict(
    count=64,
    holdout=16,
    vae=dict(max_steps=4, train_batch_size=8, lr_warmup_steps=1),
    unet=dict(max_steps=4, train_batch_size=8),
    evaluate=dict(n=1, steps=4, bpd_count=8, stride=250, bpd_draws=2),
)


def recipe(name: str) -> Path:
    """A YAML recipe of configs/, found beside the training package (a source checkout or an
    editable install, which is what `make demo` makes)."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    if not path.is_file():
        raise FileNotFoundError(
            f"recipe {str(path)!r} not found: run the demo from a source checkout of sdlite "
            "(pip install -e .), whose configs/ folder holds the recipes"
        )
    return path


def config(cls: type, name: str, **values: Any):
    """``cls`` from the recipe ``name``, with ``values`` over it (each converted to its field's type)."""
    path = recipe(name)
    return from_dict(cls, {**load_yaml(path), **values}, source=str(path))


class Stopwatch:
    """Times named stages: ``with watch("vae"): ...``; ``watch.seconds`` maps name -> seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        @contextlib.contextmanager
        def timed():
            print(f"\n=== {name} ===", flush=True)
            start = time.perf_counter()
            yield
            self.seconds[name] = time.perf_counter() - start
            print(f"=== {name}: {self.seconds[name]:.0f} s ===", flush=True)

        return timed()


def run_demo(out: str | Path = "runs/demo", fast: bool = False) -> dict:
    """Data -> VAE -> U-Net -> samples.png and the figures, each stage timed; returns the results
    (also written to out/results.json). Runs on torch's current thread count (the command sets it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch()
    data, model = out / "data", out / "model"

    with watch("data"):
        count, holdout = (FAST["count"], FAST["holdout"]) if fast else (DEMO_COUNT, DEMO_HOLDOUT)
        write_dataset(data, count=count, seed=0, exclude=DEMO_UNSEEN, holdout=holdout)
        print(f"{count} training and {holdout} held-out images in {data}, without: {', '.join(DEMO_UNSEEN)}")

    with watch("vae"):
        vae_cfg = config(
            VAETrainConfig,
            "tiny-vae.yaml",
            train_data_dir=data / "train",
            eval_data_dir=data / "test",
            output_dir=out / "vae",
            **(FAST["vae"] if fast else {}),
        )
        vae = train_vae.train(vae_cfg)
        trip = read_round_trip(vae["path"], data / "test")

    with watch("unet"):
        unet_cfg = config(
            TrainConfig,
            "tiny-shapes.yaml",
            train_data_dir=data / "train",
            vae_path=vae["path"],
            output_dir=out / "unet",
            final_dir=model,
            cache_dir=out / "cache",
            **(FAST["unet"] if fast else {}),
        )
        train.train(unet_cfg)

    with watch("evaluate"):
        results = run_evaluation(
            str(model),
            unseen=DEMO_UNSEEN,
            data=str(data / "test"),
            grid_path=out / "samples.png",
            round_trip=False,  # the VAE stage read it
            **(FAST["evaluate"] if fast else {"bpd_count": DEMO_BPD_COUNT}),
        )

    results["vae_psnr"] = vae["psnr"]
    results["vae_scaling_factor"] = vae["scaling_factor"]
    results.update(trip)
    results["stage_seconds"] = watch.seconds
    results["total_seconds"] = sum(watch.seconds.values())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results, model, out / "samples.png"))
    return results


def read_round_trip(vae_path: str | Path, held_out: Path) -> dict:
    """The trained VAE's round trip of the held-out images, read strictly (``sdlite evaluate``'s)."""
    vae = AutoencoderKL.from_pretrained(vae_path).eval()
    images, _ = held_out_data(str(held_out), ROUND_TRIP_COUNT, vae.config.sample_size, seed=0)
    return round_trip_figures(vae, images)


def summary(results: dict, model: Path, samples: Path) -> str:
    seconds = results["stage_seconds"]
    lines = ["", "=== sdlite demo ===", f"model:   {model}", f"samples: {samples}", ""]
    for name, s in seconds.items():
        lines.append(f"  {name:<10} {s:>6.0f} s")
    total = results["total_seconds"]
    lines.append(f"  {'total':<10} {total:>6.0f} s  ({total / 60:.1f} min)")
    lines.append("")
    lines.append(f"prompt fidelity  {results['fidelity']:.1%}  (colour and shape read back from the pixels)")
    if results.get("fidelity_unseen") is not None:
        lines.append(
            f"  pairs seen in training {results['fidelity_seen']:.1%}, never seen "
            f"({', '.join(DEMO_UNSEEN)}) {results['fidelity_unseen']:.1%}"
        )
    axes = results["diversity_by_axis"]
    lines.append(
        f"diversity        {results['diversity']:.2f}  (spread of position and size over the data's: "
        f"x {axes['x']:.2f}, y {axes['y']:.2f}, size {axes['size']:.2f})"
    )
    draws = results["bound"]["draws"]
    lines.append(
        f"bits/dim         {results['bpd']:.3f} ± {results['bpd_spread']:.3f}  (standard error over "
        f"{len(draws)} draws of the sampled terms; eps-MSE {results['bound']['eps_mse']:.4f})"
    )
    lines.append(f"VAE PSNR         {results['vae_psnr']:.1f} dB  (held-out images)")
    shapes = ", ".join(f"{s} {v:.0%}" for s, v in sorted(results["vae_round_trip_by_shape"].items()))
    lines.append(
        f"VAE round trip   {results['vae_round_trip']:.1%}  (held-out images back as they went in, read "
        f"strictly: {shapes})"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    run_demo(args.out, fast=args.fast)
    return 0
