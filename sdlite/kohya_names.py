"""kohya's module names, both ways: ``lora_unet_down_blocks_0_attentions_0_proj_in`` is diffusers'
``down_blocks.0.attentions.0.proj_in`` in the U-Net, and for SDXL ``lora_unet_input_blocks_4_1_...``
names the U-Net's blocks the original (SGM) way (``sdlite.unet_names``' rules).

kohya joins a module path with "_", so reading one back must know which underscores belong to a
name (``COMPOUND_NAMES``); an SGM name is looked up in a table of the U-Net it is for, made from that
U-Net's config (SDXL 1.0's when none is given), and each module's widths are checked against it.
"""

from __future__ import annotations

import re

KOHYA_PARTS = {
    "lora_unet": "unet",
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",  # SDXL's first text encoder
    "lora_te2": "text_encoder_2",
}

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
SGM_BLOCK = re.compile(r"^(?:lora_unet_)?(input_blocks|middle_block|output_blocks)_\d")


class LoraFileError(ValueError):
    """A LoRA file this module cannot read or write as asked; the message names what and why."""


def model_path(part: str, module: str) -> str:
    """The module's path in the model: transformers >= 5 has no ``text_model`` level in CLIPTextModel
    (SD's encoder, SDXL's first), which kohya's names (and older diffusers files) keep; SDXL's second,
    a CLIPTextModelWithProjection, still has it."""
    if part == "text_encoder_2" and module.startswith("encoder."):
        return "text_model." + module
    return module.removeprefix("text_model.") if part == "text_encoder" else module


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


def split_kohya_name(name: str) -> tuple[str, str]:
    """``lora_te2_text_model_...`` -> ("text_encoder_2", "text_model_..."): the part and the rest."""
    prefix = next(p for p in sorted(KOHYA_PARTS, key=len, reverse=True) if name.startswith(p + "_"))
    return KOHYA_PARTS[prefix], name.removeprefix(prefix + "_")


def place_module(name: str, width_in: int, width_out: int, unet_config=None) -> tuple[str, str]:
    """kohya's module name -> (part, the module's path in the model); an SGM-named U-Net module is
    found, widths checked, in the U-Net of ``unet_config`` (SDXL 1.0's when None)."""
    part, rest = split_kohya_name(name)
    module = unet_module(name, rest, width_in, width_out, unet_config) if part == "unet" else None
    return part, module or model_path(part, module_path(rest))


# ---- SDXL: the U-Net's blocks in the original (SGM) layout ------------------------------------------


def _original_names(unet_config) -> dict[str, tuple[str, int, int]]:
    """{original module path: (diffusers module path, in, out)} of the U-Net ``unet_config`` gives."""
    from sdlite.presets import PRESETS
    from sdlite.unet_names import diffusers_modules

    return diffusers_modules(unet_config if unet_config is not None else PRESETS["sdxl"].unet)


def _which_unet(unet_config) -> str:
    return "SDXL 1.0's U-Net" if unet_config is None else "the U-Net given"


def unet_module(name: str, rest: str, width_in: int, width_out: int, unet_config=None) -> str | None:
    """The diffusers path of an SGM-named U-Net module (``input_blocks_4_1_...``); None for a name in
    diffusers' own layout (``down_blocks_1_...``). A name or width that U-Net lacks is refused."""
    if not SGM_BLOCK.match(rest):
        return None
    table = {k.replace(".", "_"): v for k, v in _original_names(unet_config).items()}
    if rest not in table:
        raise LoraFileError(
            f"{name!r} names the U-Net's blocks the original (SGM) way, and {_which_unet(unet_config)} "
            "has no such module: a LoRA for another model (load it into its pipeline, or pass --model)"
        )
    module, want_in, want_out = table[rest]
    if (width_in, width_out) != (want_in, want_out):
        raise LoraFileError(
            f"{name!r} is {width_in} -> {width_out} wide where {_which_unet(unet_config)} has "
            f"{want_in} -> {want_out}: a LoRA for another U-Net (load it into its pipeline, or pass --model)"
        )
    return module


def sgm_name(module: str, width_in: int, width_out: int, unet_config=None) -> str:
    """A diffusers U-Net module path -> kohya's SDXL name for it (after ``lora_unet_``), widths checked."""
    by_diffusers = {v[0]: (k, v[1], v[2]) for k, v in _original_names(unet_config).items()}
    if module not in by_diffusers or by_diffusers[module][1:] != (width_in, width_out):
        raise LoraFileError(
            f"the U-Net module {module!r} ({width_in} -> {width_out}) is not in {_which_unet(unet_config)}: "
            "pass the model it was trained on (--model, or the unet_config argument)"
        )
    return by_diffusers[module][0].replace(".", "_")


def is_sdxl(modules: dict, unet_config=None) -> bool:
    """Whether ``modules`` are an SDXL LoRA: its U-Net has the "text_time" added embedding; without a
    config, the LoRA adapts a second text encoder or cross-attends to SDXL's 2048-wide text states."""
    if unet_config is not None:
        return unet_config.get("addition_embed_type") == "text_time"
    return any(
        part == "text_encoder_2" or (module.endswith("attn2.to_k") and m.down.shape[1] == 2048)
        for (part, module), m in modules.items()
    )
