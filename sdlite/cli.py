"""The ``sdlite`` command: make the shapes data, generate, evaluate, and run the whole demo.

    sdlite data shapes --out data/shapes --count 2000 --exclude "red circle" --holdout 256
    sdlite generate "a red circle" --model runs/demo/model --num_images 4 --out out.png --upscale 4
    sdlite generate "a cat" --model sd15.safetensors --scheduler euler_a --negative_prompt "blurry" \
        --num_inference_steps 30 --guidance_scale 7 --width 512 --height 768 --seed 1
    sdlite generate "a magenta circle" --model runs/tiny-shapes/final --lora runs/tiny-lora/final:0.8
    sdlite evaluate --model runs/demo/model --n 8
    sdlite demo --out runs/demo [--fast]
    sdlite launch --num_processes 1 training/train.py --config configs/tiny-shapes.yaml
    sdlite train --config tiny-lora [--num_processes N] [--key value ...]
    sdlite train-vae --config tiny-vae

This module is only the parser and the dispatcher: it imports no torch, so ``--help`` and argument
errors answer at once. Each command lives in a module of its own (training/cmd_data.py, cmd_generate.py,
cmd_evaluate.py, demo.py), imported only when that command runs. A command is an ``add_*`` function
below, listed in ``build_parser``: it makes its parser with ``_parser`` (or a group of them with
``_group``), naming the function that runs it as ``"package.module:function"``, which gets the parsed
arguments and returns the exit status. The command is the library's, so it lives here, where its name
leads; the commands sit on the layers above (pipelines, training), so this module reaches them only
inside functions, when a command runs (tests/test_layering.py holds it to that).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import shlex
import sys
from pathlib import Path

DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 7.5  # generate: Stable Diffusion's usual scale
# evaluate: the tiny shapes model's trade-off. Guidance buys prompt fidelity with diversity, so it is
# moderate and applied only for t <= 300: layout and size are then drawn unguided, colour and shape
# settled with guidance (benchmarks/RESULTS.md, "evaluate's guidance").
EVAL_GUIDANCE = 2.0
EVAL_GUIDANCE_INTERVAL = (0.0, 300.0)


# ---- the machine ---------------------------------------------------------------------------------


def _threads_per_core() -> int:
    """Hardware threads per core (2 with SMT / hyper-threading), from Linux's CPU topology; else 1."""
    try:
        siblings = Path("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list").read_text().strip()
    except OSError:
        return 1
    count = 0
    for part in siblings.split(","):  # "0,4" or "0-1"
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return max(1, count)


def physical_cores() -> int:
    """The cores this process may run on, one per physical core: a second hardware thread on the same
    core only competes for its arithmetic units, and an OpenMP team waits for its slowest member."""
    try:
        logical = len(os.sched_getaffinity(0))  # the CPUs this process is allowed (containers, taskset)
    except AttributeError:  # macOS, Windows
        logical = os.cpu_count() or 1
    return max(1, logical // _threads_per_core())


def default_threads() -> int:
    """torch's CPU threads when --threads is not given: $OMP_NUM_THREADS if set, else physical_cores()."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else physical_cores()


# ---- argument types ------------------------------------------------------------------------------


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1 (argparse turns the error into a usage error, exit 2)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _interval(text: str) -> tuple[float, float] | None:
    """argparse type of --guidance_interval: ``LO,HI`` timesteps, or ``none`` (guide every step)."""
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give two timesteps LO,HI (e.g. 0,600) or none") from None
    if not 0 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= LO <= HI")
    return lo, hi


def _timesteps(text: str) -> list[int]:
    """argparse type of --timesteps: ``T1,T2,...``, whole timesteps from high to low."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give timesteps high to low: 599,439,279,119") from None
    if values[-1] < 0 or any(high <= low for high, low in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"{text!r}: timesteps must be >= 0 and go from high to low")
    return values


def _custom_timesteps(parser) -> None:
    parser.add_argument(
        "--timesteps",
        type=_timesteps,
        default=None,
        help="sample at these timesteps, T1,T2,... from high to low, instead of --steps evenly spaced "
        "(diffusers' timesteps=; e.g. an LCM-LoRA of a linear-beta model: docs/training.md)",
    )


def _guidance_interval(parser, default) -> None:
    shown = "none" if default is None else f"{default[0]:g},{default[1]:g}"
    parser.add_argument(
        "--guidance_interval",
        type=_interval,
        default=default,
        help=f"guide only the steps with LO <= t <= HI, as LO,HI; none: every step (default: {shown})",
    )


def lora_spec(text: str) -> tuple[str, float | None]:
    """argparse type of --lora: ``PATH`` or ``PATH:SCALE`` -> (path, scale); the path must exist here.

    The scale is what follows the last colon when it reads as a number, so a path may hold colons;
    None without one (generate's ``--scale`` then, else 1)."""
    path, scale = text, None
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(
            f"no such file or folder: {path!r} (a LoRA is read from local files only: a training run's "
            "final/ folder or a .safetensors file)"
        )
    return path, scale


# ---- the commands --------------------------------------------------------------------------------


def _parser(commands, name: str, help: str, run: str) -> argparse.ArgumentParser:
    """A subcommand's parser; ``run`` ("module:function") is imported only when the command runs."""
    # allow_abbrev=False: a shortened flag (--num_image) fails instead of silently setting another.
    parser = commands.add_parser(name, help=help, description=help, allow_abbrev=False)
    parser.set_defaults(run=run)
    return parser


def _group(commands, name: str, help: str):
    """A command with subcommands of its own (``sdlite data shapes``): returns their subparsers."""
    group = commands.add_parser(name, help=help, description=help, allow_abbrev=False)
    return group.add_subparsers(dest="subcommand", required=True)


def _threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive,
        default=None,
        help="torch's CPU threads (default: $OMP_NUM_THREADS, else the physical cores: "
        f"{physical_cores()} here)",
    )


def add_data(commands) -> None:
    kinds = _group(commands, "data", "make a built-in data set, or clean a cache folder")
    shapes = _parser(
        kinds, "shapes", "coloured shapes on a plain background, captioned", "training.cmd_data:shapes"
    )
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
    clean = _parser(
        kinds, "clean-cache", "remove what no run used for --keep_days from a latent and text cache folder",
        "sdlite.data.cache_clean:run",
    )  # fmt: skip
    clean.add_argument("--cache_dir", default="~/.cache/sdlite", help="the runs' cache_dir")
    clean.add_argument("--keep_days", type=float, default=30.0, help="keep what a run used this recently")


def add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="a diffusers-layout model folder, or a single-file .safetensors checkpoint",
    )
    parser.add_argument(
        "--model_config",
        default="sd15",
        help="the architecture of a single-file --model, which holds only weights: a preset "
        "(tiny, small, sd15; default sd15) or a model folder whose configs to use",
    )


def add_generate(commands) -> None:
    from training.schedulers import SCHEDULERS  # plain data: no torch, no diffusers

    gen = _parser(commands, "generate", "generate images for a prompt", "training.cmd_generate:run")
    gen.set_defaults(check=functools.partial(_check_generate, gen))
    gen.add_argument("prompt")
    add_model(gen)
    # diffusers' argument names first; --steps and --guidance stay as the same flags' earlier names.
    gen.add_argument("--negative_prompt", default=None, help="what to steer away from (default: nothing)")
    gen.add_argument(
        "--num_inference_steps", "--steps", type=_positive, default=DEFAULT_STEPS, help="denoising steps"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--guidance_scale", "--guidance", type=float, default=DEFAULT_GUIDANCE,
        help="classifier-free guidance weight (1: none)",
    )  # fmt: skip
    _guidance_interval(gen, None)
    _custom_timesteps(gen)
    gen.add_argument("--height", type=_positive, default=None, help="pixels (default: the model's size)")
    gen.add_argument("--width", type=_positive, default=None, help="pixels (default: the model's size)")
    gen.add_argument(
        "--scheduler",
        choices=list(SCHEDULERS),
        default="ddpm",
        help="the sampler, made from the model's scheduler config (default ddpm: the model's own)",
    )
    gen.add_argument("--image", default=None, help="start from this picture (image to image), its size")
    gen.add_argument(
        "--strength", type=float, default=None,
        help="with --image: how much to change it, 0-1 (default: the pipeline's, 0.8; 1 with --mask)",
    )  # fmt: skip
    gen.add_argument("--mask", default=None, help="with --image: repaint where this picture is white")
    gen.add_argument("--num_images", type=_positive, default=1)
    gen.add_argument("--upscale", type=_positive, default=1, help="enlarge the PNG this many times (nearest)")
    gen.add_argument("--out", default="out.png", help="PNG to write; a grid when several images")
    gen.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="LoRA weights (a training run's final/ folder or a .safetensors file) at a scale "
        "(default --scale; 0 is the base model); repeat for several, e.g. --lora a:0.8 --lora b:0.5",
    )
    gen.add_argument(
        "--scale",
        type=float,
        default=None,
        metavar="LORA_SCALE",
        help="the scale of each --lora given without :SCALE (default 1), as in diffusers and A1111; "
        "it does not resize the image: that is --upscale",
    )
    _threads(gen)


def _check_generate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no single flag can check: ``--scale`` used, as before, to enlarge the PNG; image flags
    without ``--image``."""
    for flag in ("strength", "mask"):
        if getattr(args, flag) is not None and args.image is None:
            parser.error(f"--{flag} goes with --image (the picture to change): add --image IN.png")
    if args.scale is not None and not args.lora:
        parser.error(
            "--scale is the scale of LoRA weights given by --lora FILE (or set each with --lora "
            "FILE:SCALE), and no --lora was given; to enlarge the PNG, use --upscale"
        )


FIRST_LORA_SCALE = 0.8  # the usual first try with a new LoRA: most of its effect, less of its overfitting
WRITTEN = {  # what a training run's final folder holds, for the line that names it
    "pytorch_lora_weights.safetensors": "the LoRA: sdlite generate --lora, diffusers' load_lora_weights",
    "lora_kohya.safetensors": "the LoRA in kohya's layout: A1111, ComfyUI",
    "train_config.yaml": "this run's settings",
    "sdlite_final.json": "which run wrote the folder",
}


def final_message(final: str | Path, base: str | None, prompt: str, lora: bool, sampler: tuple[str, ...] = (),
                  scale: float = FIRST_LORA_SCALE) -> str:  # fmt: skip
    """What a training run wrote in ``final``, and a ready-to-paste ``sdlite generate`` line drawing
    ``prompt`` with it: the LoRA on its ``base`` folder at ``scale``, or the model folder itself; with
    the ``sampler`` flags (a distilled model's scheduler, steps and guidance)."""
    final = Path(final)
    entries = sorted(final.iterdir(), key=lambda p: p.name)
    names = [
        f"{p.name}/" if p.is_dir() else f"{p.name} ({WRITTEN[p.name]})" if p.name in WRITTEN else p.name
        for p in entries
        if not p.name.startswith(".")  # the run folder's own marks
    ]
    written = f"saved {final}: {', '.join(names)}"
    if not lora:
        line = shlex.join(["sdlite", "generate", "--model", str(final), *sampler, prompt])
        return f"{written}\ngenerate with: {line}"
    if base is None:
        return f"{written}\n(its base was a preset's random weights, read from no folder: no generate line)"
    from sdlite.kohya import weights_file  # a LoHa's or LoKr's folder holds lora_kohya.safetensors alone

    spec = f"{weights_file(final)}:{scale:g}"
    line = shlex.join(["sdlite", "generate", "--model", str(base), "--lora", spec, *sampler, prompt])
    return f"{written}\ngenerate with: {line}"


def add_evaluate(commands) -> None:
    from training.schedulers import SCHEDULERS  # plain data: no torch, no diffusers

    ev = _parser(
        commands,
        "evaluate",
        "prompt fidelity (lenient and strict), diversity, the VAE's round trip read strictly, and "
        "bits/dim on shapes",
        "training.cmd_evaluate:run",
    )
    add_model(ev)
    ev.add_argument("--n", type=_positive, default=8, help="images per prompt")
    ev.add_argument("--steps", type=_positive, default=DEFAULT_STEPS)
    ev.add_argument("--guidance", type=float, default=EVAL_GUIDANCE)
    ev.add_argument(
        "--scheduler", choices=list(SCHEDULERS), default="ddpm",
        help="the sampler (lcm: a latent consistency model's, e.g. with --lora LCM_LORA --guidance 1)",
    )  # fmt: skip
    ev.add_argument(
        "--lora", type=lora_spec, action="append", default=[], metavar="PATH[:SCALE]",
        help="LoRA weights evaluated on the model, at SCALE (default 1); repeat for several",
    )  # fmt: skip
    _guidance_interval(ev, EVAL_GUIDANCE_INTERVAL)
    _custom_timesteps(ev)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--colours", type=_csv, default=None, help="prompts' colours; default: all")
    ev.add_argument("--shapes", type=_csv, default=None, help="prompts' shapes; default: all")
    ev.add_argument("--unseen", action="append", default=[], help="a pair left out of training")
    ev.add_argument(
        "--data",
        default=None,
        help="held-out image folder (the training data's distribution) for bits/dim, the VAE's round "
        "trip and the spread the diversity is measured against; default: drawn from the shapes "
        "generator's default settings",
    )
    ev.add_argument("--bpd_count", type=_positive, default=256, help="held-out latents for bits/dim")
    ev.add_argument("--stride", type=_positive, default=10, help="sum every k-th bound term (x k)")
    ev.add_argument(
        "--bpd_draws",
        type=_positive,
        default=3,
        help="independent draws of the bound's sampled terms; bits/dim is their mean, ± their standard error",
    )
    ev.add_argument("--grid", default=None, help="also write the generated images as one PNG")
    ev.add_argument("--json", default=None, help="also write the figures as JSON")
    _threads(ev)


def add_demo(commands) -> None:
    demo = _parser(commands, "demo", "data -> VAE -> U-Net -> samples and figures", "training.demo:run")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--fast", action="store_true", help="a few steps of each stage, to test the chain")
    _threads(demo)


def add_lora(commands) -> None:
    from sdlite import lora_command  # imports no torch until a file is converted

    lora = _group(commands, "lora", "LoRA files")
    convert = _parser(
        lora, "convert", "diffusers <-> kohya (A1111, ComfyUI) layout, keeping each module's alpha",
        "sdlite.lora_command:run",
    )  # fmt: skip
    lora_command.add_arguments(convert)
    inspect = _parser(
        lora, "inspect", "what a LoRA / LyCORIS / embedding file is, and whether it loads on --model",
        "sdlite.lora_command:run_inspect",
    )  # fmt: skip
    lora_command.add_inspect_arguments(inspect)


def add_launch(commands) -> None:
    launch = _parser(
        commands, "launch",
        "accelerate launch that, on SIGTERM or Ctrl-C, waits for the trainer's checkpoint "
        "(sdlite launch [accelerate options] training/train.py --config ...)",
        "sdlite.cli:run_launch",
    )  # fmt: skip
    launch.add_argument("argv", nargs=argparse.REMAINDER, help="accelerate options, the script, its flags")


def add_train(commands) -> None:
    for name, what in (("train", "the U-Net (or a LoRA)"), ("train-vae", "the VAE")):
        train = _parser(
            commands, name,
            f"train {what} under accelerate, from any folder: --config a recipe's name or file, then "
            f"settings (sdlite {name} --help lists them; diffusers' and kohya's flags are read too)",
            "sdlite.cli:run_train",
        )  # fmt: skip
        train.add_argument("argv", nargs=argparse.REMAINDER, help="launcher options, the trainer's settings")


def run_train(args: argparse.Namespace) -> int:
    """Not reached: main passes ``sdlite train ...`` on unparsed (argparse would take the trainer's flags)."""
    from training import cmd_train

    return cmd_train.main(args.command, args.argv)


def run_launch(args: argparse.Namespace) -> int:
    """Only ``sdlite launch`` with nothing after it comes here (main passes the rest on unparsed)."""
    from training import launch

    return launch.main(args.argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlite", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (add_data, add_generate, add_evaluate, add_demo, add_lora, add_launch, add_train):
        add(commands)
    return parser


# ---- dispatch ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from training.quiet import quiet_third_party  # logging filters only: imports nothing heavy

    quiet_third_party()  # before any command imports diffusers, transformers or accelerate
    if argv[:1] == ["launch"] and argv[1:2] not in ([], ["-h"], ["--help"]):
        # Everything after "launch" is accelerate's and the script's: argparse would take their options.
        from training import launch

        return launch.main(argv[1:])
    if argv[:1] in (["train"], ["train-vae"]):  # the trainer's flags, and its --help, are its own
        from training import cmd_train

        return cmd_train.main(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    if "check" in args:  # checks across a command's flags, still before torch is imported
        args.check(args)
    module, _, function = args.run.partition(":")
    run = getattr(importlib.import_module(module), function)
    import torch  # only now: a command runs

    from sdlite.models import ModelFolderError

    previous = torch.get_num_threads()
    if "threads" in args:
        torch.set_num_threads(args.threads or default_threads())
    try:
        return run(args)
    except (ModelFolderError, FileNotFoundError, ValueError) as e:
        print(f"sdlite {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    sys.exit(main())
