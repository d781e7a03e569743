"""``sdlite lora convert SRC OUT --to kohya|diffusers``: a LoRA file from one layout to the other;
``sdlite lora inspect FILE [--model M]``: what a LoRA, LyCORIS or embedding file is, and whether it
would load on a model.

The layouts and their rules are ``sdlite.kohya``'s (LyCORIS: ``sdlite.lycoris``, embeddings:
``sdlite.textual_inversion``); this module is the command line over them. An
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


# ---- sdlite lora inspect ---------------------------------------------------------------------------


def add_inspect_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("file", metavar="FILE", help="a LoRA / LyCORIS .safetensors file, or an embedding")
    parser.add_argument(
        "--model", default=None,
        help="a preset name or model folder: say whether the file would load on it, module by module",
    )  # fmt: skip
    return parser


def describe(file: str | Path, model: str | None = None) -> list[str]:
    """The lines ``sdlite lora inspect`` prints: kind, family, modules, rank, alpha, and with ``model``
    whether each module finds its layer there with its widths."""
    import safetensors

    from sdlite.kohya import weights_file
    from sdlite.kohya_names import LoraFileError

    path = weights_file(file)
    config = unet_config_of(model) if model else unet_config_of(header_base_model(path))
    keys: list[str] = []
    if path.suffix == ".safetensors" and path.is_file():
        with safetensors.safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    lines = [f"file: {path}"]
    try:
        return lines + _describe(path, keys, config, model)
    except LoraFileError as e:  # a module with no place in the U-Net it was read for
        if model is None:
            raise
        return [*lines, f"loads on {model}: no: {e}"]


def _describe(path: Path, keys: list[str], config, model: str | None) -> list[str]:
    from sdlite.kohya import detect_layout, read_modules
    from sdlite.kohya_names import SGM_BLOCK
    from sdlite.lycoris import is_lycoris, read_lycoris
    from sdlite.textual_inversion import read_embedding

    lines = []
    if keys and is_lycoris(keys):
        modules = read_lycoris(str(path), config)
        kinds = sorted(
            {m.kind for m in modules.values()}
            | ({"dora"} if any(m.dora for m in modules.values()) else set())
        )
        lines.append(f"what: LyCORIS ({', '.join(kinds)}), kohya's key layout: A1111, ComfyUI")
        ranks, alphas = {m.rank for m in modules.values()}, {m.alpha for m in modules.values()}
        widths = {key: m.widths() for key, m in modules.items()}
    elif keys and _is_lora(keys, detect_layout):
        modules, layout, base = read_modules(path, config)
        lines.append(f"what: LoRA, {layout} layout" + (f"; base model {base}" if base else ""))
        ranks, alphas = {m.rank for m in modules.values()}, {m.alpha for m in modules.values()}
        widths = {key: (m.down[0].numel(), m.up.shape[0]) for key, m in modules.items()}
    else:
        embedding = read_embedding(path)
        width = ", ".join(f"{k or 'width'} {v.shape[1]}" for k, v in embedding.vectors.items())
        lines += [f"what: textual-inversion embedding, the word {embedding.token!r}",
                  f"for: {embedding.family}", f"vectors: {embedding.num_vectors} ({width})"]  # fmt: skip
        return lines + ([] if model is None else _embedding_fit(embedding, _meta_models(model), model))
    parts = {}
    for part, _ in modules:
        parts[part] = parts.get(part, 0) + 1
    # SDXL's files name a second encoder, or SDXL's blocks the SGM way (sd-scripts' SD 1.x files never do)
    sdxl = "text_encoder_2" in parts or any(
        k.startswith(("lora_te1_", "lora_te2_")) or SGM_BLOCK.search(k) for k in keys
    )
    lines.append(f"for: {'SDXL' if sdxl else 'SD 1.x/2.x'}")
    lines.append(f"modules: {len(modules)} ({', '.join(f'{p} {n}' for p, n in sorted(parts.items()))})")
    lines.append(f"rank: {_listed(ranks)}; alpha: {_listed(alphas)}")
    if model is not None:
        lines += _fit(widths, _meta_models(model), model)
    return lines


def _is_lora(keys, detect_layout) -> bool:
    from sdlite.kohya_names import LoraFileError

    try:
        detect_layout(keys)
    except LoraFileError:
        return False
    return True


def _listed(values) -> str:
    return ", ".join(
        "none" if v is None else f"{v:g}" for v in sorted(values, key=lambda v: (v is None, v or 0))
    )


def _meta_models(model: str) -> dict:
    """The model's U-Net and text encoders on the meta device: their names and shapes, no weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlite.presets import PRESETS

    configs = {}
    if model in PRESETS:
        preset = PRESETS[model]
        configs = {
            p: preset.config(p)
            for p in ("unet", "text_encoder", "text_encoder_2")
            if getattr(preset, p, None)
        }
    else:
        for part in ("unet", "text_encoder", "text_encoder_2"):
            config = Path(model) / part / "config.json"
            if config.is_file():
                configs[part] = json.loads(config.read_text())
    if "unet" not in configs:
        raise ValueError(f"--model {model!r} is neither a preset name nor a model folder")
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(configs["unet"])}
        for part, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if part in configs:
                fields = {k: v for k, v in configs[part].items() if not k.startswith("_")}
                models[part] = cls(CLIPTextConfig(**fields))
    return models


def _fit(widths: dict, models: dict, name: str) -> list[str]:
    problems = []
    for (part, module), (width_in, width_out) in sorted(widths.items()):
        layer = _layer(models.get(part), module)
        have = (layer.weight[0].numel(), layer.weight.shape[0]) if layer is not None else None
        if have is None:
            problems.append(f"{part}.{module}: no such layer")
        elif have != (width_in, width_out):
            problems.append(
                f"{part}.{module}: {width_in} -> {width_out} wide, the layer {have[0]} -> {have[1]}"
            )
    if not problems:
        return [f"loads on {name}: yes, all {len(widths)} modules find their layer with their widths"]
    return [f"loads on {name}: no, {len(problems)} of {len(widths)} modules do not fit, e.g.", *problems[:5]]


def _layer(model, module: str):
    for candidate in (module, module.removeprefix("text_model."), "text_model." + module):
        try:
            return model.get_submodule(candidate) if model is not None else None
        except AttributeError:
            continue
    return None


def _embedding_fit(embedding, models: dict, name: str) -> list[str]:
    encoders = {"": "text_encoder", "clip_l": "text_encoder", "clip_g": "text_encoder_2"}
    problems = []
    for key, vectors in embedding.vectors.items():
        encoder = models.get(encoders[key])
        width = encoder.get_input_embeddings().weight.shape[1] if encoder is not None else None
        if encoder is None:
            problems.append(f"{key}: the model has no {encoders[key]}")
        elif width != vectors.shape[1]:
            problems.append(f"{key or 'vectors'} {vectors.shape[1]} wide, {encoders[key]} reads {width}")
    if len(embedding.vectors) == 1 and "text_encoder_2" in models:
        problems.append("one vector set; SDXL's embeddings hold clip_l and clip_g")
    return [f"loads on {name}: " + ("yes" if not problems else "no: " + "; ".join(problems))]


def run_inspect(args: argparse.Namespace) -> int:
    from sdlite.kohya_names import LoraFileError
    from sdlite.textual_inversion import EmbeddingFileError

    try:
        print("\n".join(describe(args.file, args.model)))
    except (LoraFileError, EmbeddingFileError, ValueError) as e:
        print(f"sdlite lora inspect: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
