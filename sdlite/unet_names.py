"""The original names of diffusers' U-Net weights: CompVis' for SD 1.x/2.x, Stability's (SGM) for SDXL.

One-file checkpoints (``pipelines/single_file*.py``) and kohya's SDXL LoRA files (``sdlite/kohya.py``)
both name the U-Net's blocks this way. The names follow from the block structure by rule:

    down_blocks.{i}.resnets.{j}     input_blocks.{1 + i(L+1) + j}.0       L = layers_per_block
    down_blocks.{i}.attentions.{j}  input_blocks.{1 + i(L+1) + j}.1
    down_blocks.{i}.downsamplers.0  input_blocks.{(i+1)(L+1)}.0.op
    mid_block.resnets.{0,1}         middle_block.{0,2};  mid_block.attentions.0  middle_block.1
    up_blocks.{i}.resnets.{j}       output_blocks.{i(L+1) + j}.0         (j = 0..L)
    up_blocks.{i}.attentions.{j}    output_blocks.{i(L+1) + j}.1
    up_blocks.{i}.upsamplers.0      output_blocks.{i(L+1) + L}.{2 with attention, else 1}
    resnet: norm1 in_layers.0, conv1 in_layers.2, norm2 out_layers.0, conv2 out_layers.3,
            time_emb_proj emb_layers.1, conv_shortcut skip_connection

Inside an attention block (``proj_in``, ``transformer_blocks.{k}.attn1.to_q``...) the names are the
same in both. The rest (time embedding, conv_in/out, norms) comes from diffusers' fixed table.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

UNET_FIXED = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
               "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}  # fmt: skip


def rename_prefix(rest: str, table: dict[str, str]) -> str:
    """``rest`` with its leading module name replaced by ``table``'s, if it has one there."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def blocks_shape(unet_config) -> tuple[int, list[bool]]:
    """(L, which up levels have attention): what the rules need of a U-Net's config."""
    layers = unet_config["layers_per_block"]
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if isinstance(layers, (list, tuple)) and len(set(layers)) == 1:
        layers = layers[0]
    if not isinstance(layers, int) or mid is None:
        # The original layout numbers its blocks by one count of ResNet blocks a level, and has a middle
        # block: a U-Net shaped otherwise (sdlite's from-scratch shape keys) has no names there.
        raise ValueError(
            f"this U-Net (layers_per_block {layers}, mid_block_type {mid}) has no original-layout "
            "names, which need one ResNet count for every level and a middle block"
        )
    return layers, ["CrossAttn" in kind for kind in unet_config["up_block_types"]]


def unet_key(key: str, layers: int, up_attention: list[bool]) -> str:
    """One diffusers U-Net key -> its original name (the rules in the module docstring)."""
    if key in UNET_FIXED:
        return UNET_FIXED[key]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, rename_prefix(rest, UNET_RESNET)) if kind == "resnets" else (1, rest)
        return f"input_blocks.{1 + i * (layers + 1) + j}.{sub}.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        if m[1] == "resnets":
            return f"middle_block.{2 * int(m[2])}.{rename_prefix(m[3], UNET_RESNET)}"
        return f"middle_block.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        sub, rest = (0, rename_prefix(rest, UNET_RESNET)) if kind == "resnets" else (1, rest)
        return f"output_blocks.{i * (layers + 1) + j}.{sub}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        i = int(m[1])
        return f"output_blocks.{i * (layers + 1) + layers}.{2 if up_attention[i] else 1}.{m[2]}"
    raise ValueError(f"no original-layout name for U-Net key {key!r} (not an SD 1.x U-Net?)")


def original_module(module: str, unet_config) -> str:
    """A diffusers U-Net module's path (``down_blocks.1.attentions.0.proj_in``) -> its original one."""
    return unet_key(module + ".weight", *blocks_shape(unet_config)).removesuffix(".weight")


def diffusers_modules(unet_config) -> dict[str, tuple[str, int, int]]:
    """{original module path: (diffusers module path, in, out)} for every linear and convolution of this
    U-Net (a convolution's in counts in·kh·kw): the rules above run over its weight names, turned around."""
    return {original: (module, i, o) for original, module, i, o in _modules(_json(unet_config))}


def _json(unet_config) -> str:
    return json.dumps(dict(unet_config), sort_keys=True, default=list)


@lru_cache(maxsize=4)
def _modules(config_json: str) -> tuple[tuple[str, str, int, int], ...]:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    config = json.loads(config_json)
    with init_empty_weights():  # the names and shapes only: no memory for the weights
        unet = UNet2DConditionModel.from_config(config)
    layers, up_attention = blocks_shape(config)
    rows = []
    for key, weight in unet.state_dict().items():
        if not key.endswith(".weight") or weight.ndim < 2:  # norms have no in and out widths
            continue
        try:
            original = unet_key(key, layers, up_attention)
        except ValueError:  # SDXL's add_embedding: named by single_file_xl's own table, never a LoRA's
            continue
        module = key.removesuffix(".weight")
        rows.append((original.removesuffix(".weight"), module, weight[0].numel(), weight.shape[0]))
    return tuple(rows)
