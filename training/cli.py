"""The ``sdlite`` command: make the shapes data, generate, evaluate, and run the whole demo.

    sdlite data shapes --out data/shapes --count 2000 --exclude "red circle" --holdout 256
    sdlite generate "a red circle" --model runs/demo/model --num_images 4 --out out.png
    sdlite generate "a magenta circle" --model runs/tiny-shapes/final --lora runs/tiny-lora/final
    sdlite evaluate --model runs/demo/model --n 8
    sdlite demo --out runs/demo [--fast]

It lives in ``training/`` because it sits on everything else: the library (sdlite), the pipeline
and the trainers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdlite import fidelity, likelihood
from sdlite.data.dataset import ImageTransform, caption_text, image_bytes, load_rows
from sdlite.data.shapes import allowed_pairs, draw, sample_specs, write_dataset
from sdlite.images import grid
from sdlite.models import ModelFolderError
from sdlite.pipelines.text_to_image import TextToImagePipeline
from sdlite.training import train, train_vae
from sdlite.training.config import parse_config

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5  # generate: Stable Diffusion's usual scale
# evaluate: the tiny shapes model's best trade-off. Its fidelity and diversity at 1 / 1.5 / 2 / 3 / 7.5:
# 96.5% 0.90 / 99.3% 0.87 / 100% 0.81 / 100% 0.73 / 100% 0.59: guidance buys fidelity with diversity.
EVAL_GUIDANCE = 2.0


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the ValueError into a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


# ---------------------------------------------------------------------------------------------------
# sdlite data shapes
# ---------------------------------------------------------------------------------------------------


def cmd_data_shapes(args: argparse.Namespace) -> int:
    out = write_dataset(
        args.out,
        count=args.count,
        seed=args.seed,
        image_size=args.size,
        colours=args.colours,
        shapes=args.shapes,
        exclude=args.exclude,
        size_word_prob=args.size_word_prob,
        holdout=args.holdout,
    )
    split = f" in train/ and {args.holdout} in test/" if args.holdout else ""
    print(f"wrote {args.count} images{split} with metadata.jsonl to {out}")
    return 0


# ---------------------------------------------------------------------------------------------------
# sdlite generate / evaluate
# ---------------------------------------------------------------------------------------------------


def load_pipeline(path: str):
    """The text-to-image pipeline of a model folder, quiet (no progress bars)."""
    pipe = TextToImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def cmd_generate(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model)
    extra = {}
    if args.lora:  # a folder or file that diffusers' load_lora_weights reads (training's final_dir)
        pipe.load_lora_weights(args.lora)
        extra["cross_attention_kwargs"] = {"scale": args.lora_scale}
    images = pipe(
        args.prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
        **extra,
    ).images
    rows = 1 if len(images) <= 8 else int(len(images) ** 0.5)
    image = grid(images, rows=rows, scale=args.scale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, {image.width}x{image.height})")
    return 0


def evaluation_prompts(colours: list[str] | None, shapes: list[str] | None) -> list[str]:
    return [f"a {c} {s}" for c, s in allowed_pairs(colours, shapes)]


def run_evaluation(
    model: str,
    n: int = 8,
    steps: int = DEFAULT_STEPS,
    guidance: float = EVAL_GUIDANCE,
    seed: int = 0,
    colours: list[str] | None = None,
    shapes: list[str] | None = None,
    unseen: list[str] = (),
    data: str | None = None,
    bpd_count: int = 256,
    stride: int = 10,
    grid_path: str | Path | None = None,
) -> dict:
    """Fidelity and diversity of generated images, bits per dimension of held-out latents; printed
    and returned as a dict."""
    pipe = load_pipeline(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    prompts = evaluation_prompts(colours, shapes)
    start = time.perf_counter()
    generate = fidelity.pipeline_generate(pipe, steps, guidance)
    report = fidelity.prompt_fidelity(
        generate, prompts, n=n, seed=seed, image_size=size, unseen=unseen, keep_images=grid_path is not None
    )
    fidelity_s = time.perf_counter() - start
    print(report.table())
    print(f"({len(prompts)} prompts x {n} images, {steps} steps, guidance {guidance}: {fidelity_s:.0f} s)")
    if grid_path is not None:
        images = [im for _, batch in report.images for im in batch]
        # Prompts run colour-major, so with one row per colour a row holds its shapes side by side.
        rows = len({c for c, _ in allowed_pairs(colours, shapes)})
        grid(images, rows=rows, scale=2).save(grid_path)
        print(f"wrote {grid_path}: a row per colour, {n} images per prompt, pixels doubled")

    start = time.perf_counter()
    images, captions = held_out_data(data, bpd_count, size, seed)
    bound = likelihood.variational_bound(pipe, images, captions, stride=stride, seed=seed)
    bpd_s = time.perf_counter() - start
    print(f"held-out {bound.line()} ({bpd_s:.0f} s)")
    return {
        "fidelity": report.fidelity,
        "fidelity_seen": report.fidelity_of(seen=True),
        "fidelity_unseen": report.fidelity_of(seen=False),
        "diversity": report.diversity,
        "per_prompt": {s.prompt: s.correct for s in report.scores},
        "bpd": bound.bpd,
        "bound": vars(bound),
        "steps": steps,
        "guidance": guidance,
        "n": n,
        "seconds": {"fidelity": fidelity_s, "bpd": bpd_s},
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


def cmd_evaluate(args: argparse.Namespace) -> int:
    results = run_evaluation(
        args.model,
        n=args.n,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        colours=args.colours,
        shapes=args.shapes,
        unseen=args.unseen,
        data=args.data,
        bpd_count=args.bpd_count,
        stride=args.stride,
        grid_path=args.grid,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------
# sdlite demo
# ---------------------------------------------------------------------------------------------------

# The demo's data: every colour-shape pair but one, which the model is then asked for.
DEMO_UNSEEN = ["red circle"]
DEMO_COUNT, DEMO_HOLDOUT = 2000, 256
# --fast: a few steps of every stage, to test the chain (tests/test_demo.py), not to learn anything.
FAST = dict(
    count=64,
    holdout=16,
    vae=dict(max_steps=4, train_batch_size=8, lr_warmup_steps=1),
    unet=dict(max_steps=4, train_batch_size=8),
    n=1,
    steps=4,
    bpd_count=8,
    stride=250,
)


def flags(**values) -> list[str]:
    """``--key value`` command-line flags, as training/config.py parses them."""
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


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


def demo_threads() -> int:
    """Half the cores, at least one. A team of OpenMP threads waits at every barrier for its slowest
    member, so a full-width team stalls whenever anything else wants a core: on a 2-core machine with
    one other job running, 150 U-Net steps took 51 s on 1 thread and 82-112 s on 2."""
    return max(1, (os.cpu_count() or 2) // 2)


def run_demo(out: str | Path = "runs/demo", fast: bool = False, threads: int | None = None) -> dict:
    """Data -> VAE -> U-Net -> samples.png and the figures, each stage timed; returns the results
    (also written to out/results.json). ``threads``: torch's CPU threads (None: ``demo_threads()``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads or demo_threads())
    try:
        return _run_demo(Path(out), fast)
    finally:
        torch.set_num_threads(previous)


def _run_demo(out: Path, fast: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    watch = Stopwatch()
    data, vae_dir, model = out / "data", out / "vae", out / "model"

    with watch("data"):
        count, holdout = (FAST["count"], FAST["holdout"]) if fast else (DEMO_COUNT, DEMO_HOLDOUT)
        write_dataset(data, count=count, seed=0, exclude=DEMO_UNSEEN, holdout=holdout)
        print(f"{count} training and {holdout} held-out images in {data}, without: {', '.join(DEMO_UNSEEN)}")

    with watch("vae"):
        argv = flags(
            config=recipe("tiny-vae.yaml"),
            train_data_dir=data / "train",
            eval_data_dir=data / "test",
            output_dir=vae_dir,
            **(FAST["vae"] if fast else {}),
        )
        vae = train_vae.train(parse_config(train_vae.VAETrainConfig, argv))

    with watch("unet"):
        argv = flags(
            config=recipe("tiny-shapes.yaml"),
            train_data_dir=data / "train",
            vae_path=vae["path"],
            output_dir=out / "unet",
            final_dir=model,
            cache_dir=out / "cache",
            **(FAST["unet"] if fast else {}),
        )
        train.main(argv)

    with watch("evaluate"):
        kw = dict(n=FAST["n"], steps=FAST["steps"], bpd_count=FAST["bpd_count"], stride=FAST["stride"])
        results = run_evaluation(
            str(model),
            unseen=DEMO_UNSEEN,
            data=str(data / "test"),
            grid_path=out / "samples.png",
            **(kw if fast else {}),
        )

    results["vae_psnr"] = vae["psnr"]
    results["vae_scaling_factor"] = vae["scaling_factor"]
    results["stage_seconds"] = watch.seconds
    results["total_seconds"] = sum(watch.seconds.values())
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary(results, model, out / "samples.png"))
    return results


def summary(results: dict, model: Path, samples: Path) -> str:
    seconds = results["stage_seconds"]
    lines = ["", "=== sdlite demo ===", f"model:   {model}", f"samples: {samples}", ""]
    for name, s in seconds.items():
        lines.append(f"  {name:<10} {s:>6.0f} s")
    lines.append(
        f"  {'total':<10} {results['total_seconds']:>6.0f} s  ({results['total_seconds'] / 60:.1f} min)"
    )
    lines.append("")
    lines.append(f"prompt fidelity  {results['fidelity']:.1%}  (colour and shape read back from the pixels)")
    if results.get("fidelity_unseen") is not None:
        lines.append(
            f"  pairs seen in training {results['fidelity_seen']:.1%}, never seen "
            f"({', '.join(DEMO_UNSEEN)}) {results['fidelity_unseen']:.1%}"
        )
    lines.append(
        f"diversity        {results['diversity']:.2f}  (spread of position and size over the data's)"
    )
    lines.append(f"bits/dim         {results['bpd']:.3f}  (eps-MSE {results['bound']['eps_mse']:.4f})")
    lines.append(f"VAE PSNR         {results['vae_psnr']:.1f} dB  (held-out images)")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    run_demo(args.out, fast=args.fast, threads=args.threads)
    return 0


# ---------------------------------------------------------------------------------------------------
# The parser
# ---------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlite", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="make a built-in data set")
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", help="coloured shapes on a plain background, captioned")
    shapes.add_argument("--out", required=True, help="folder to write (images + metadata.jsonl)")
    shapes.add_argument("--count", type=_positive, default=2000, help="images (of train/ with --holdout)")
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--size", type=_positive, default=32, help="image side in pixels")
    shapes.add_argument("--colours", type=_csv, default=None, help="comma-separated; default: all")
    shapes.add_argument("--shapes", type=_csv, default=None, help="comma-separated; default: all")
    shapes.add_argument(
        "--exclude",
        action="append",
        default=[],
        help='leave out a pair ("red circle"), a colour or a shape; repeatable',
    )
    shapes.add_argument("--size_word_prob", type=float, default=0.5, help="how often captions name the size")
    shapes.add_argument("--holdout", type=int, default=0, help="also write this many to test/")
    shapes.set_defaults(func=cmd_data_shapes)

    gen = commands.add_parser("generate", help="generate images for a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--model", required=True, help="a diffusers-layout model folder")
    gen.add_argument("--steps", type=_positive, default=DEFAULT_STEPS)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    gen.add_argument("--num_images", type=_positive, default=1)
    gen.add_argument("--scale", type=_positive, default=1, help="enlarge the PNG this many times (nearest)")
    gen.add_argument("--out", default="out.png", help="PNG to write; a grid when several images")
    gen.add_argument("--lora", default=None, help="LoRA weights to load (a training run's final/ folder)")
    gen.add_argument("--lora_scale", type=float, default=1.0, help="the adapter's scale (0: the base)")
    gen.set_defaults(func=cmd_generate)

    ev = commands.add_parser("evaluate", help="prompt fidelity, diversity and bits/dim on shapes")
    ev.add_argument("--model", required=True)
    ev.add_argument("--n", type=_positive, default=8, help="images per prompt")
    ev.add_argument("--steps", type=_positive, default=DEFAULT_STEPS)
    ev.add_argument("--guidance", type=float, default=EVAL_GUIDANCE)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--colours", type=_csv, default=None, help="prompts' colours; default: all")
    ev.add_argument("--shapes", type=_csv, default=None, help="prompts' shapes; default: all")
    ev.add_argument("--unseen", action="append", default=[], help="a pair left out of training")
    ev.add_argument("--data", default=None, help="held-out image folder for bits/dim; default: drawn")
    ev.add_argument("--bpd_count", type=_positive, default=256, help="held-out latents for bits/dim")
    ev.add_argument("--stride", type=_positive, default=10, help="sum every k-th bound term (x k)")
    ev.add_argument("--grid", default=None, help="also write the generated images as one PNG")
    ev.add_argument("--json", default=None, help="also write the figures as JSON")
    ev.set_defaults(func=cmd_evaluate)

    demo = commands.add_parser("demo", help="data -> VAE -> U-Net -> samples and figures")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--fast", action="store_true", help="a few steps of each stage, to test the chain")
    demo.add_argument("--threads", type=_positive, default=None, help="CPU threads (default: half the cores)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"sdlite {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
