"""``sdlite lora convert SRC OUT --to kohya|diffusers``: a LoRA file from one layout to the other.

The layouts and their rules are ``sdlite.kohya``'s; this module is the command line over them. An
SDXL LoRA's kohya names depend on its U-Net's shape, so the command finds the model it is for:
``--model`` (a preset name or a diffusers-layout model folder), else the base model the file's header
names when that is a preset or a folder here, else SDXL 1.0's shape.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# torch, safetensors and peft are imported where used, so that `sdlite lora convert --help` is instant.


def unet_config_of(model: str | None) -> dict | None:
    """The U-Net config of a preset name or a model folder; None for None or a name not found here."""
    from sdlite.presets import PRESETS

    if model is None:
        return None
    if model in PRESETS:
        return dict(PRESETS[model].unet)
    config = Path(model) / "unet" / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def header_base_model(src: str | Path) -> str | None:
    """The base model a LoRA file's header names (sdlite's ``sdlite`` key), or None."""
    import safetensors

    from sdlite.kohya import SDLITE_METADATA_KEY, weights_file

    try:
        with safetensors.safe_open(weights_file(src), framework="pt") as f:
            header = f.metadata() or {}
        return json.loads(header.get(SDLITE_METADATA_KEY, "{}")).get("base_model")
    except Exception:  # unreadable: convert_lora_file names what is wrong with it
        return None


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``lora convert``, on a parser or subparser the caller made."""
    parser.add_argument(
        "src", metavar="SRC", help="LoRA .safetensors file, or a folder with pytorch_lora_weights.safetensors"
    )
    parser.add_argument(
        "out", metavar="OUT", help="the .safetensors file to write; with --to diffusers also a folder"
    )
    parser.add_argument(
        "--to", required=True, choices=("kohya", "diffusers"),
        help="kohya: the A1111 / ComfyUI / sd-scripts layout (lora_unet_..., per-module alpha; SDXL's "
        "U-Net blocks named input_blocks_... as sd-scripts names them); diffusers: the layout sdlite "
        "and diffusers' load_lora_weights read",
    )  # fmt: skip
    parser.add_argument(
        "--model", default=None,
        help="the model the LoRA is for (a preset name or a model folder): where an SDXL LoRA's U-Net "
        "blocks go; default: the base model in the file's header, else SDXL 1.0's U-Net",
    )  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdlite lora convert",
        description="Convert a LoRA between diffusers' layout and kohya's (A1111, ComfyUI), keeping "
        "each module's alpha.",
        allow_abbrev=False,
    )
    return add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from sdlite.kohya import LoraFileError, convert_lora_file

    try:
        model = args.model or header_base_model(args.src)
        config = unet_config_of(model)
        if args.model and config is None:
            raise LoraFileError(f"--model {args.model!r} is neither a preset name nor a model folder")
        file = convert_lora_file(args.src, args.out, to=args.to, overwrite=args.overwrite, unet_config=config)
    except LoraFileError as e:
        print(f"sdlite lora convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {file} ({args.to} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
