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
adapter trained with another alpha at the wrong strength.

The U-Net keeps diffusers' module names for SD 1.x/2.x, as sd-scripts does. For SDXL, sd-scripts names
the U-Net's blocks the original (SGM) way, ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``
for diffusers' ``down_blocks.1.attentions.0...`` (the rules are ``sdlite.unet_names``', shared with
one-file checkpoints), and so do we; both namings are read. Where those names go depends on the
U-Net's shape (``layers_per_block``): each function that maps them takes the U-Net's config, and
without one assumes SDXL 1.0's. Each mapped module's widths are checked against that U-Net's.

Only safetensors files are read: a pickled LoRA could run code when loaded.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdlite.kohya_names import KOHYA_PARTS, LoraFileError, is_sdxl, model_path, place_module, sgm_name

# torch, safetensors and peft are imported where used, so that `sdlite lora convert --help` is instant.

KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
DIFFUSERS_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
SDLITE_METADATA_KEY = "sdlite"  # sdlite.lora's: the base model
DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHT_NAME = "lora_kohya.safetensors"  # what save_lora(..., format="kohya") writes beside it


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


def _kohya_path(part: str, module: str) -> str:
    if part.startswith("text_encoder") and not module.startswith(("text_model.", "text_projection")):
        return "text_model." + module
    return module


# ---- reading -----------------------------------------------------------------------------------


def weights_file(path: str | Path) -> Path:
    """A folder's ``pytorch_lora_weights.safetensors`` (or, in a folder without one, its
    ``lora_kohya.safetensors``: what a LoHa or LoKr run writes), or the file itself."""
    path = Path(path)
    if not path.is_dir():
        return path
    diffusers, kohya = path / DIFFUSERS_WEIGHT_NAME, path / KOHYA_WEIGHT_NAME
    return kohya if kohya.is_file() and not diffusers.exists() else diffusers


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


def is_kohya_key(key: str) -> bool:
    return any(key.startswith(prefix + "_") for prefix in KOHYA_PARTS)


def detect_layout(keys) -> str:
    """ "kohya" or "diffusers", from the tensor names; a clear error for anything else."""
    keys = sorted(keys)
    if not keys:
        raise LoraFileError("the file holds no tensors")
    kohya = [k for k in keys if is_kohya_key(k)]
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
        modules[(part, model_path(part, module))] = LoraModule(down, up, alpha)
    return modules


def kohya_alpha(name: str, alpha, rank: int) -> float:
    """A module's ``.alpha`` tensor as a number; alpha = r without one (kohya's default)."""
    if alpha is not None and alpha.numel() != 1:
        raise LoraFileError(f"{name}.alpha has shape {tuple(alpha.shape)}; expected a single number")
    return float(alpha.item()) if alpha is not None else float(rank)


def modules_from_kohya(tensors: dict, unet_config=None) -> Modules:
    """The modules of a kohya-layout file; a module without ``.alpha`` has alpha = r (kohya's default).
    SGM-named U-Net modules are placed in the U-Net of ``unet_config`` (SDXL 1.0's when None)."""
    groups = _group(tensors, KOHYA_SUFFIXES, "a LyCORIS file (LoHa, LoKr, DoRA): sdlite.lycoris reads it")
    modules: Modules = {}
    for name, group in sorted(groups.items()):
        down, up = group.get(".lora_down.weight"), group.get(".lora_up.weight")
        _pair(name, down, up)
        alpha = kohya_alpha(name, group.get(".alpha"), down.shape[0])
        place = place_module(name, down[0].numel(), up.shape[0], unet_config)  # in: in·kh·kw for a conv
        modules[place] = LoraModule(down, up, alpha)
    return modules


def read_modules(path: str | Path, unet_config=None) -> tuple[Modules, str, str | None]:
    """(modules, layout, base model or None) of a LoRA file in either layout; ``unet_config`` places
    SGM-named U-Net modules (SDXL 1.0's U-Net when None)."""
    tensors, header = load_lora_file(path)
    layout = detect_layout(tensors)
    try:
        if layout == "kohya":
            modules = modules_from_kohya(tensors, unet_config)
        else:
            modules = modules_from_diffusers(tensors, header)
    except LoraFileError as e:
        raise LoraFileError(f"{str(weights_file(path))!r}: {e}") from None
    base = json.loads(header.get(SDLITE_METADATA_KEY, "{}")).get("base_model")
    return modules, layout, base


# ---- writing -----------------------------------------------------------------------------------


def sdlite_header(base_model: str | None) -> dict[str, str]:
    return {"format": "pt", SDLITE_METADATA_KEY: json.dumps({"base_model": base_model})}


def kohya_name(part: str, module: str, width_in: int, width_out: int, sdxl: bool, unet_config=None) -> str:
    """kohya's name of a module (``lora_unet_...``, ``lora_te_...``): an SDXL U-Net's in SGM block names
    (its widths checked against the U-Net of ``unet_config``), SDXL's encoders ``lora_te1``/``lora_te2``."""
    prefix = "lora_te1" if part == "text_encoder" and sdxl else KOHYA_PREFIXES[part]
    if part == "unet" and sdxl:
        return f"{prefix}_{sgm_name(module, width_in, width_out, unet_config)}"
    return f"{prefix}_{_kohya_path(part, module).replace('.', '_')}"


def kohya_header(network_module: str, sdxl: bool) -> dict[str, str]:
    """What sd-scripts' files say they are: the network's module, and SDXL's base model version."""
    header = {"ss_network_module": network_module}
    return header | {"ss_base_model_version": "sdxl_base_v1-0"} if sdxl else header


def to_kohya(modules: Modules, unet_config=None) -> tuple[dict, dict[str, str]]:
    """(tensors, header) in kohya's layout, each module with its own alpha as a 0-d float32 tensor;
    an SDXL LoRA's U-Net modules get their SGM names in the U-Net of ``unet_config`` (default SDXL 1.0's).

    The header has no ``lora_adapter_metadata``: diffusers refuses a file with both that and alphas.
    """
    import torch

    sdxl = is_sdxl(modules, unet_config)
    tensors, header = {}, kohya_header("networks.lora", sdxl)
    for (part, module), m in modules.items():
        name = kohya_name(part, module, m.down[0].numel(), m.up.shape[0], sdxl, unet_config)
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


def write_lora(
    modules: Modules, file: str | Path, to: str, base_model: str | None = None, unet_config=None
) -> Path:
    """Write ``modules`` to ``file`` in layout ``to`` ("kohya" or "diffusers"), via a temporary file so
    that a failure (a full disk: LoraFileError saying what to free) leaves no half-written file behind.
    ``unet_config``: the U-Net an SDXL LoRA's kohya names are for (``to_kohya``)."""
    if to not in ("kohya", "diffusers"):
        raise LoraFileError(f"unknown layout {to!r}: choose 'kohya' or 'diffusers'")
    if not modules:
        raise LoraFileError("no LoRA modules to write")
    tensors, header = to_kohya(modules, unet_config) if to == "kohya" else to_diffusers(modules)
    return save_atomically(tensors, {**sdlite_header(base_model), **header}, file)


def save_atomically(tensors: dict, header: dict[str, str], file: str | Path) -> Path:
    """Write a safetensors file via a temporary one, so that a failure (a full disk: LoraFileError saying
    what to free) leaves no half-written file behind, and an existing file unchanged."""
    import safetensors.torch

    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(file.name + ".partial")
    try:
        safetensors.torch.save_file(tensors, partial, metadata=header)
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


def _is_dora(file: Path) -> bool:
    """Whether a safetensors LoRA file is a DoRA, from its tensor names alone."""
    import safetensors

    from sdlite.lycoris import is_dora_file

    if not file.is_file() or file.suffix != ".safetensors":
        return False  # load_lora_file names what is wrong with it
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            return is_dora_file(dict.fromkeys(f.keys()))
    except Exception:  # not a safetensors file: load_lora_file says so
        return False


def detect_dora_layout(tensors: dict) -> str:
    """ "kohya" (LyCORIS' keys) or "diffusers" for a DoRA's tensors."""
    return "kohya" if all(map(is_kohya_key, tensors)) else "diffusers"


def convert_lora_file(
    src: str | Path, out: str | Path, to: str = "kohya", overwrite: bool = False, unet_config=None
) -> Path:
    """Convert a LoRA file (or a folder holding ``pytorch_lora_weights.safetensors``) to layout ``to``.

    ``out`` is the ``.safetensors`` file to write; for ``to="diffusers"`` it may be a folder, which
    gets ``pytorch_lora_weights.safetensors`` (what ``load_lora_weights(folder)`` reads). Returns the
    file written. Refuses pickles, unknown layouts, a file already in layout ``to``, and an existing
    ``out`` unless ``overwrite``. ``unet_config``: the U-Net of the model the LoRA is for, which
    places an SDXL LoRA's SGM-named U-Net modules (SDXL 1.0's U-Net when None). A DoRA goes between
    diffusers' layout and LyCORIS' kohya keys (``dora_scale``: ``sdlite.lycoris.convert_dora``).
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
    if _is_dora(src):  # kohya's LoRA layout has no magnitude: LyCORIS' has (sdlite.lycoris)
        from sdlite.lycoris import convert_dora

        tensors, header = load_lora_file(src)
        if detect_dora_layout(tensors) == to:
            raise LoraFileError(f"{str(src)!r} is already in {to}'s layout")
        base = json.loads(header.get(SDLITE_METADATA_KEY, "{}")).get("base_model")
        return convert_dora(tensors, header, out, to, unet_config, base)
    modules, layout, base = read_modules(src, unet_config)
    if layout == to:
        raise LoraFileError(f"{str(src)!r} is already in {to}'s layout")
    return write_lora(modules, out, to, base_model=base, unet_config=unet_config)
