"""LoRA files in kohya's layout (sd-scripts, A1111, ComfyUI) and back, each module at its trained strength.

Both layouts hold, for each adapted layer, LoRA's two matrices (Hu et al. 2021): A of shape (r, in)
and B of shape (out, r), for the update ``W' = W + (alpha / r) * B @ A``. They differ in names and in
where alpha lives:

    diffusers  unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight  (A)
               unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight  (B)
               alpha: the LoraConfig of each part in the header (``lora_alpha``, ``alpha_pattern``);
               a file without one means alpha = r
    kohya      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
               lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
               lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha  (0-d)

Text encoders are ``lora_te_text_model_encoder_layers_0_self_attn_q_proj``; SDXL's two are
``lora_te1_`` and ``lora_te2_``. Every module here carries the alpha that gives its trained scale
(alpha / r, or alpha / sqrt(r) for rsLoRA); diffusers' own converter writes alpha = r, which loads an
adapter trained with another alpha at the wrong strength. The U-Net keeps diffusers' module names
(as sd-scripts does for SD 1.x); kohya's SDXL files name the U-Net's blocks the original way
(``input_blocks_4_1``) and are refused here for now.

Only safetensors files are read: a pickled LoRA could run code when loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# torch, safetensors and peft are imported where used, so that `sdlite lora convert --help` is instant.

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PARTS = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",  # SDXL's first text encoder
    "lora_te2": "text_encoder_2",
}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
SDLITE_METADATA_KEY = "sdlite"  # sdlite.lora's: the base model
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"  # what save_lora(..., format="kohya") writes beside it

# Module names that contain "_", in diffusers' U-Net and CLIP's text encoder. kohya joins a module
# path with "_", so reading one back must know which underscores belong to a name.
COMPOUND_NAMES = (
    "down_blocks up_blocks mid_block transformer_blocks to_q to_k to_v to_out proj_in proj_out conv_in "
    "conv_out conv_norm_out conv_shortcut time_emb_proj time_embedding linear_1 linear_2 add_embedding "
    "text_model self_attn q_proj k_proj v_proj out_proj layer_norm1 layer_norm2 final_layer_norm "
    "text_projection token_embedding position_embedding"
).split()
SIMPLE_NAMES = set(
    "attentions resnets downsamplers upsamplers attn1 attn2 ff net proj conv conv1 conv2 norm norm1 norm2 "
    "norm3 encoder layers mlp fc1 fc2 embeddings".split()
)
_COMPOUNDS = sorted((n.split("_") for n in COMPOUND_NAMES), key=len, reverse=True)


class LoraFileError(ValueError):
    """A LoRA file this module cannot read or write as asked; the message names what and why."""


@dataclass
class LoraModule:
    """One adapted layer: the update is ``(alpha / rank) * up @ down``."""

    down: Any  # A, torch.Tensor (r, in) or (r, in, kh, kw)
    up: Any  # B, torch.Tensor (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


Modules = dict[tuple[str, str], LoraModule]  # (part, module path in the model) -> LoraModule


def _model_path(part: str, module: str) -> str:
    """The module's path in the model: transformers >= 5 has no ``text_model`` level in CLIP's text
    models, which kohya's names (and older diffusers files) keep."""
    return module.removeprefix("text_model.") if part.startswith("text_encoder") else module


def _kohya_path(part: str, module: str) -> str:
    if part.startswith("text_encoder") and not module.startswith(("text_model.", "text_projection")):
        return "text_model." + module
    return module


# ---- reading -----------------------------------------------------------------------------------


def weights_file(path: str | Path) -> Path:
    """A folder's ``pytorch_lora_weights.safetensors``, or the file itself."""
    path = Path(path)
    return path / DIFFUSERS_WEIGHT_NAME if path.is_dir() else path


def load_lora_file(path: str | Path) -> tuple[dict, dict[str, str]]:
    """(tensors, header) of a safetensors LoRA file; anything else is refused, never unpickled."""
    import safetensors.torch

    file = weights_file(path)
    if not file.is_file():
        raise LoraFileError(f"{str(file)!r} does not exist")
    refuse_pickle(file)
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
        tensors = safetensors.torch.load_file(file)
    except Exception as e:  # safetensors reports a bad header as several error types
        raise LoraFileError(f"{str(file)!r} is not a safetensors file ({e})") from None
    return tensors, header


def refuse_pickle(file: Path) -> None:
    """Refuse a torch.save / pickle file by its first bytes, before anything tries to read it."""
    with file.open("rb") as f:
        head = f.read(9)  # safetensors: the header's length (u64) then the header, a JSON object
    pickled = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"  # torch.save's zip, or a bare pickle
    if pickled and head[8:9] != b"{":
        raise LoraFileError(
            f"{str(file)!r} is a pickle (a torch.save / .ckpt / .bin file), refused: unpickling can run "
            "code. Ask for the .safetensors version of this LoRA"
        )


def _is_kohya(key: str) -> bool:
    return any(key.startswith(prefix + "_") for prefix in KOHYA_PARTS)


def detect_layout(keys) -> str:
    """ "kohya" or "diffusers", from the tensor names; a clear error for anything else."""
    keys = sorted(keys)
    if not keys:
        raise LoraFileError("the file holds no tensors")
    kohya = [k for k in keys if _is_kohya(k)]
    diffusers = [
        k for k in keys if k.split(".")[0] in KOHYA_PREFIXES and (".lora_A." in k or ".lora_B." in k)
    ]
    if len(kohya) == len(keys):
        return "kohya"
    if len(diffusers) == len(keys):
        return "diffusers"
    others = [k for k in keys if k not in kohya and k not in diffusers]
    raise LoraFileError(
        f"not a LoRA layout sdlite knows: {len(others)} of {len(keys)} tensor names fit neither, e.g. "
        f"{others[:3]}. Expected diffusers' (unet.<module>.lora_A.weight / .lora_B.weight, also under "
        "text_encoder. and text_encoder_2.) or kohya's (lora_unet_<module>.lora_down.weight / "
        ".lora_up.weight / .alpha, also lora_te_, lora_te1_, lora_te2_)"
    )


def _pair(name: str, down, up) -> None:
    """The shape checks both layouts share: A (r, in[, kh, kw]) and B (out, r[, 1, 1])."""
    if down is None or up is None:
        raise LoraFileError(f"{name}: has {'B (up)' if down is None else 'A (down)'} but not its partner")
    if down.ndim != up.ndim or down.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
        raise LoraFileError(
            f"{name}: the shapes do not match: A (down) {tuple(down.shape)}, B (up) {tuple(up.shape)}; "
            "expected (r, in) and (out, r), or (r, in, kh, kw) and (out, r, 1, 1) for a convolution"
        )


def _group(tensors: dict, suffixes: tuple[str, ...], refusal: str) -> dict[str, dict]:
    """{module name: {suffix: tensor}}; a name with another ending is refused, naming ``refusal``."""
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise LoraFileError(f"{key!r} is not plain LoRA (names end in {', '.join(suffixes)}): {refusal}")
        groups.setdefault(key.removesuffix(suffix), {})[suffix] = value
    return groups


def part_configs(header: dict[str, str]) -> dict[str, dict]:
    """Each part's LoraConfig fields from a diffusers-layout header ({} when the file has none)."""
    configs = json.loads(header.get(ADAPTER_METADATA_KEY, "{}"))
    out: dict[str, dict] = {}
    for key, value in configs.items():
        part, _, field = key.partition(".")
        out.setdefault(part, {})[field] = value
    return out


def modules_from_diffusers(tensors: dict, header: dict[str, str]) -> Modules:
    """The modules of a diffusers/peft-layout file, each with the alpha its header gives (alpha = r
    without one, as diffusers assumes)."""
    from peft.utils.other import get_pattern_key  # how peft matches rank_pattern / alpha_pattern keys

    configs = part_configs(header)
    groups = _group(tensors, DIFFUSERS_SUFFIXES, "a LoRA bias or DoRA, which kohya's layout cannot hold")
    modules: Modules = {}
    for full, group in sorted(groups.items()):
        part, module = full.split(".", 1)
        down, up = group.get(".lora_A.weight"), group.get(".lora_B.weight")
        _pair(full, down, up)
        config = configs.get(part)
        if not config:
            alpha = float(down.shape[0])
        else:
            if config.get("use_dora"):
                raise LoraFileError(f"the {part} adapter is a DoRA, which kohya's LoRA layout cannot hold")
            pattern = config.get("alpha_pattern") or {}
            key = get_pattern_key(pattern.keys(), module)
            alpha = float(pattern.get(key, config["lora_alpha"]))
            if config.get("use_rslora"):  # scale alpha / sqrt(r): the plain-LoRA alpha of that scale
                alpha = alpha * math.sqrt(down.shape[0])
        modules[(part, _model_path(part, module))] = LoraModule(down, up, alpha)
    return modules


def module_path(name: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0`` -> diffusers' dotted path."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        compound = next((c for c in _COMPOUNDS if tokens[i : i + len(c)] == c), None)
        step = len(compound) if compound else 1
        parts.append("_".join(tokens[i : i + step]))
        i += step
    unknown = [p for p in parts if not p.isdigit() and p not in SIMPLE_NAMES and p not in COMPOUND_NAMES]
    if unknown:
        raise LoraFileError(
            f"cannot tell which '_' in {name!r} separate module names: {unknown} is not a module name of "
            "diffusers' SD U-Net or CLIP's text encoder"
        )
    return ".".join(parts)


def modules_from_kohya(tensors: dict) -> Modules:
    """The modules of a kohya-layout file; a module without ``.alpha`` has alpha = r (kohya's default)."""
    groups = _group(tensors, KOHYA_SUFFIXES, "LyCORIS / LoHa / LoKr / DoRA files are not supported")
    modules: Modules = {}
    for name, group in sorted(groups.items()):
        prefix = next(p for p in sorted(KOHYA_PARTS, key=len, reverse=True) if name.startswith(p + "_"))
        rest = name.removeprefix(prefix + "_")
        if prefix == "lora_unet" and re.match(r"(input_blocks|middle_block|output_blocks)_", rest):
            raise LoraFileError(
                f"{name!r} names the U-Net's blocks the original (SGM) way, as kohya's SDXL files do; "
                "only diffusers' block names (down_blocks_, mid_block_, up_blocks_) are supported yet"
            )
        down, up = group.get(".lora_down.weight"), group.get(".lora_up.weight")
        _pair(name, down, up)
        alpha = group.get(".alpha")
        if alpha is not None and alpha.numel() != 1:
            raise LoraFileError(f"{name}.alpha has shape {tuple(alpha.shape)}; expected a single number")
        alpha = float(alpha.item()) if alpha is not None else float(down.shape[0])
        part = KOHYA_PARTS[prefix]
        modules[(part, _model_path(part, module_path(rest)))] = LoraModule(down, up, alpha)
    return modules


def read_modules(path: str | Path) -> tuple[Modules, str, str | None]:
    """(modules, layout, base model or None) of a LoRA file in either layout."""
    tensors, header = load_lora_file(path)
    layout = detect_layout(tensors)
    try:
        modules = (
            modules_from_kohya(tensors) if layout == "kohya" else modules_from_diffusers(tensors, header)
        )
    except LoraFileError as e:
        raise LoraFileError(f"{str(weights_file(path))!r}: {e}") from None
    base = json.loads(header.get(SDLITE_METADATA_KEY, "{}")).get("base_model")
    return modules, layout, base


# ---- writing -----------------------------------------------------------------------------------


def _header(base_model: str | None) -> dict[str, str]:
    return {"format": "pt", SDLITE_METADATA_KEY: json.dumps({"base_model": base_model})}


def to_kohya(modules: Modules) -> tuple[dict, dict[str, str]]:
    """(tensors, header) in kohya's layout, each module with its own alpha as a 0-d float32 tensor.

    The header has no ``lora_adapter_metadata``: diffusers refuses a file with both that and alphas.
    """
    import torch

    sdxl = any(part == "text_encoder_2" for part, _ in modules)
    tensors, header = {}, {"ss_network_module": "networks.lora"}  # what sd-scripts' files say they are
    for (part, module), m in modules.items():
        prefix = "lora_te1" if part == "text_encoder" and sdxl else KOHYA_PREFIXES[part]
        name = f"{prefix}_{_kohya_path(part, module).replace('.', '_')}"
        tensors[f"{name}.lora_down.weight"] = m.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = m.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha, dtype=torch.float32)
    ranks, alphas = {m.rank for m in modules.values()}, {m.alpha for m in modules.values()}
    if len(ranks) == 1 and len(alphas) == 1:
        header |= {"ss_network_dim": str(ranks.pop()), "ss_network_alpha": str(alphas.pop())}
    return tensors, header


def to_diffusers(modules: Modules) -> tuple[dict, dict[str, str]]:
    """(tensors, header) in diffusers' layout with a LoraConfig per part that gives each module its
    alpha: the commonest rank and alpha, and ``rank_pattern`` / ``alpha_pattern`` for the others."""
    tensors, configs = {}, {}
    for part in sorted({part for part, _ in modules}):
        mine = {module: m for (p, module), m in modules.items() if p == part}
        for module, m in mine.items():
            tensors[f"{part}.{module}.lora_A.weight"] = m.down.contiguous()
            tensors[f"{part}.{module}.lora_B.weight"] = m.up.contiguous()
        rank = Counter(m.rank for m in mine.values()).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in mine.values()).most_common(1)[0][0]
        config = {
            "r": rank,
            "lora_alpha": alpha,
            # Whole module paths; peft also takes them as the end of a longer path, as in a CLIP
            # text model that still has its ``text_model`` level (transformers < 5).
            "rank_pattern": {k: m.rank for k, m in mine.items() if m.rank != rank},
            "alpha_pattern": {k: m.alpha for k, m in mine.items() if m.alpha != alpha},
            "target_modules": sorted(mine),
        }
        configs |= {f"{part}.{field}": value for field, value in config.items()}
    return tensors, {ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}


def kohya_lora_state(source) -> tuple[dict, dict] | None:
    """A kohya-layout LoRA (a ``.safetensors`` path or a state dict) as what diffusers'
    ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` take: (the state dict in diffusers'
    layout, the metadata giving each module its alpha). None for anything else, left to diffusers.

    For a pipeline's ``lora_state_dict``: diffusers' own reading of a kohya file gives every module of
    a part one alpha, the commonest (its ``alpha_pattern`` keys name no module of peft's), so a file
    whose modules differ in alpha (a resized or extracted LoRA) would load some at the wrong strength.
    """
    if isinstance(source, dict):
        tensors = source
    elif isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).suffix == ".safetensors":
        import safetensors

        refuse_pickle(Path(source))
        try:
            with safetensors.safe_open(source, framework="pt") as f:
                keys = list(f.keys())  # the names only: a diffusers-layout file is not read twice
        except Exception:  # not a safetensors file: diffusers' reading says what it is
            return None
        tensors = load_lora_file(source)[0] if keys and all(map(_is_kohya, keys)) else {}
    else:
        return None
    if not tensors or not all(map(_is_kohya, tensors)):
        return None
    try:
        modules = modules_from_kohya(tensors)
    except LoraFileError:  # LyCORIS, DoRA, SDXL's SGM block names...: diffusers' reading handles some
        return None
    state, header = to_diffusers(modules)
    return state, json.loads(header[ADAPTER_METADATA_KEY])


def write_lora(modules: Modules, file: str | Path, to: str, base_model: str | None = None) -> Path:
    """Write ``modules`` to ``file`` in layout ``to`` ("kohya" or "diffusers"), via a temporary file so
    that a failure (a full disk: LoraFileError saying what to free) leaves no half-written file behind."""
    import safetensors.torch

    if to not in ("kohya", "diffusers"):
        raise LoraFileError(f"unknown layout {to!r}: choose 'kohya' or 'diffusers'")
    if not modules:
        raise LoraFileError("no LoRA modules to write")
    tensors, header = (to_kohya if to == "kohya" else to_diffusers)(modules)
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    try:
        safetensors.torch.save_file(tensors, partial, metadata={**_header(base_model), **header})
        partial.replace(file)
    except (OSError, safetensors.SafetensorError) as e:  # a full disk, a read-only folder
        partial.unlink(missing_ok=True)  # gives the space back
        kept = f"the existing {file.name} is unchanged" if file.exists() else "no file was written"
        size = sum(t.nbytes for t in tensors.values()) / 1e6
        raise LoraFileError(
            f"could not write {str(file)!r} ({type(e).__name__}: {str(e)[:200]}); nothing was lost: "
            f"{kept}. Free at least {size:,.1f} MB on its disk, then run again"
        ) from e
    return file


def convert_lora_file(src: str | Path, out: str | Path, to: str = "kohya", overwrite: bool = False) -> Path:
    """Convert a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) to layout ``to``.

    ``out`` is the ``.safetensors`` file to write; for ``to="diffusers"`` it may be a folder, which
    gets ``pytorch_lora_weights.safetensors`` (what ``load_lora_weights(folder)`` reads). Returns the
    file written. Refuses pickles, unknown layouts, a file already in layout ``to``, and an existing
    ``out`` unless ``overwrite``.
    """
    src, out = weights_file(src), Path(out)
    if out.suffix != ".safetensors":
        if to != "diffusers":
            raise LoraFileError(f"{str(out)!r}: the kohya file to write must end in .safetensors")
        out = out / DIFFUSERS_WEIGHT_NAME
    if out.exists() and out.resolve() == src.resolve():
        raise LoraFileError(f"{str(out)!r} is the file being converted; write the result elsewhere")
    if out.exists() and not overwrite:
        raise LoraFileError(f"{str(out)!r} exists; choose another name or pass overwrite (--overwrite)")
    modules, layout, base = read_modules(src)
    if layout == to:
        raise LoraFileError(f"{str(src)!r} is already in {to}'s layout")
    return write_lora(modules, out, to, base_model=base)


# ---- command line: `sdlite lora convert SRC OUT --to kohya|diffusers` ------------------------------


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
        help="kohya: the A1111 / ComfyUI / sd-scripts layout (lora_unet_..., per-module alpha); "
        "diffusers: the layout sdlite and diffusers' load_lora_weights read",
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
    try:
        file = convert_lora_file(args.src, args.out, to=args.to, overwrite=args.overwrite)
    except LoraFileError as e:
        print(f"sdlite lora convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {file} ({args.to} layout)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
