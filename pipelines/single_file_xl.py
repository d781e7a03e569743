"""One-file checkpoints of Stable Diffusion XL (Stability's SGM layout) and SD 2.x (OpenCLIP).

The key prefixes tell the layouts apart (``LAYOUTS``):

    SD 1.x  model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.*  (CLIP)
    SD 2.x  model.diffusion_model.*  first_stage_model.*  cond_stage_model.model.*        (OpenCLIP)
    SDXL    model.diffusion_model.*  first_stage_model.*  conditioner.embedders.0.transformer.*  (CLIP-L)
                                                          conditioner.embedders.1.model.*  (OpenCLIP bigG)

The U-Net and VAE keys follow SD 1.x's rules (pipelines/single_file.py); SDXL's U-Net adds the
"text_time" embedding, ``add_embedding.linear_{1,2}`` = ``label_emb.0.{0,2}``. CLIP ViT-L is
transformers' layout under a prefix. OpenCLIP's text tower has its own layout, mapped here once, both
ways, for SD 2.x's encoder and SDXL's second:

    embeddings.token_embedding.weight     token_embedding.weight
    embeddings.position_embedding.weight  positional_embedding
    final_layer_norm.{weight,bias}        ln_final.{weight,bias}
    encoder.layers.{i}.*                  transformer.resblocks.{i}.*  with layer_norm{1,2} ln_{1,2},
                                          mlp.fc{1,2} mlp.c_{fc,proj}, self_attn.out_proj attn.out_proj
    self_attn.{q,k,v}_proj.{weight,bias}  attn.in_proj_{weight,bias}  (q, k, v stacked along dim 0)
    text_projection.weight  (p, d)        text_projection  (d, p): OpenCLIP computes x @ P, so P = W^T

SD 2.x conditions on OpenCLIP's penultimate layer, so its diffusers text encoder has one layer less
than the checkpoint and no projection: on reading, that last layer and ``text_projection`` are left
out, as is OpenCLIP's ``logit_scale`` (used only for image-text scores). Safetensors only.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    LDM_UNET_KEY,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pipelines.single_file import (
    LDM_CLIP_KEY,
    LDM_VAE_KEY,
    _architecture,
    _clip_keys_for,
    _load_weights,
    checked_path,
    read_safetensors,
    to_original_layout,
    with_input_channels,
)
from sdlite.ddpm import DDPMScheduler
from sdlite.models import Components, ModelFolderError, check_compatible, read_header
from sdlite.models_xl import ComponentsXL, check_compatible_xl, check_folder_xl, tokenizers_xl
from sdlite.presets import PRESETS, PresetXL
from sdlite.tokenizer import load_tokenizer

XL_CLIP_KEY = "conditioner.embedders.0.transformer."
XL_OPENCLIP_KEY = "conditioner.embedders.1.model."
SD2_OPENCLIP_KEY = "cond_stage_model.model."
LAYOUTS = {
    "SD 1.x": (LDM_UNET_KEY, LDM_VAE_KEY, LDM_CLIP_KEY),
    "SD 2.x": (LDM_UNET_KEY, LDM_VAE_KEY, SD2_OPENCLIP_KEY),
    "SDXL": (LDM_UNET_KEY, LDM_VAE_KEY, XL_CLIP_KEY, XL_OPENCLIP_KEY),
}
ADD_EMBEDDING = DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"]  # add_embedding.* -> label_emb.*
OPENCLIP_FIXED = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                  "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}  # fmt: skip
OPENCLIP_FIXED_INVERSE = {v: k for k, v in OPENCLIP_FIXED.items()}
OPENCLIP_LAYER_INVERSE = {v: k for k, v in OPENCLIP_LAYER.items()}
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")  # image-text score temperature; a buffer some files keep


# ---- telling the layouts apart ---------------------------------------------------------------------


def detect_layout(keys, path="checkpoint") -> str:
    """The layout (a key of LAYOUTS) whose every prefix some key has; else a clear error naming the
    prefixes found and those each layout needs."""
    keys = list(keys)
    for layout, prefixes in LAYOUTS.items():
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return layout
    known = sorted({p for ps in LAYOUTS.values() for p in ps} | {"conditioner.embedders.0.model."}, key=len)
    groups = Counter(
        next((p for p in reversed(known) if k.startswith(p)), k.split(".")[0] + ".") for k in keys
    )
    found = ", ".join(f"{p}* ({n} key{'s' * (n > 1)})" for p, n in groups.most_common(8)) or "no tensors"
    if len(groups) > 8:
        found += f" and {len(groups) - 8} other prefixes"
    expected = "; ".join(f"{name}: {', '.join(p + '*' for p in ps)}" for name, ps in LAYOUTS.items())
    hint = ""
    if "conditioner.embedders.0.model." in groups:
        hint = " It looks like an SDXL refiner (OpenCLIP bigG alone), which is not supported."
    elif any(k.startswith(("lora_", "lora_unet_", "lora_te")) or ".lora_" in k for k in keys):
        hint = " It looks like a LoRA, which loads onto a model rather than as one."
    elif any(k.startswith(("down_blocks.", "encoder.down_blocks.", "text_model.")) for k in keys):
        hint = " It looks like one model's diffusers-layout weights: load that part with from_pretrained."
    raise ValueError(
        f"{str(path)!r} is not a single-file checkpoint of a layout sdlite reads: its keys start with "
        f"{found}. Expected every prefix of one layout ({expected}).{hint}"
    )


# ---- the OpenCLIP text encoder, both ways ----------------------------------------------------------


def _alternatives(table: dict) -> str:
    return "|".join(map(re.escape, table))


def openclip_from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder's state dict -> OpenCLIP's key names (no prefix)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {}
    for key, value in state.items():
        if key in OPENCLIP_FIXED:
            out[OPENCLIP_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T  # (p, d) -> (d, p)
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            if m[2] == "q":  # k and v join it here
                qkv = [state[f"encoder.layers.{m[1]}.self_attn.{x}_proj.{m[3]}"] for x in "qkv"]
                out[f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}"] = torch.cat(qkv)
        elif m := re.fullmatch(rf"encoder\.layers\.(\d+)\.({_alternatives(OPENCLIP_LAYER)})\.(.+)", key):
            out[f"transformer.resblocks.{m[1]}.{OPENCLIP_LAYER[m[2]]}.{m[3]}"] = value
        else:
            raise ValueError(f"no OpenCLIP name for text encoder key {key!r} (not a CLIP text encoder?)")
    return out


def hf_from_openclip(state: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (keys without prefix) -> the key names of ``model``, a CLIPTextModel or
    CLIPTextModelWithProjection. Leaves out what the model has no place for by design: for a model
    without a projection (SD 2.x's), ``text_projection`` and the layer past its depth when the file has
    exactly one more (the penultimate-layer encoder); OPENCLIP_UNUSED always. Anything else stays, for
    _load_weights to name."""
    projected = isinstance(model, CLIPTextModelWithProjection)
    depth = model.config.num_hidden_layers
    layers = {m[1] for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    unused = {*OPENCLIP_UNUSED} | (set() if projected else {"text_projection"})
    skip = f"transformer.resblocks.{depth}." if not projected and len(layers) == depth + 1 else None
    out = {}
    for key, value in state.items():
        if key in unused or (skip and key.startswith(skip)):
            continue
        if key in OPENCLIP_FIXED_INVERSE:
            out["text_model." + OPENCLIP_FIXED_INVERSE[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.T.contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            for name, part in zip("qkv", value.chunk(3)):  # clones: one storage per tensor
                out[f"text_model.encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part.clone()
        elif m := re.fullmatch(
            rf"transformer\.resblocks\.(\d+)\.({_alternatives(OPENCLIP_LAYER_INVERSE)})\.(.+)", key
        ):
            out[f"text_model.encoder.layers.{m[1]}.{OPENCLIP_LAYER_INVERSE[m[2]]}.{m[3]}"] = value
        else:
            out[key] = value  # unknown: reported by _load_weights as unexpected
    return _clip_keys_for(model, out)  # transformers >= 5 drops text_model. in CLIPTextModel


def _under(checkpoint: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in checkpoint.items() if k.startswith(prefix)}


# ---- reading ---------------------------------------------------------------------------------------


def load_single_file_xl(path, config="sdxl", torch_dtype: torch.dtype | None = None) -> ComponentsXL:
    """The parts of an SDXL single-file checkpoint (SGM layout), on the architecture ``config`` names:
    an SDXL preset name, a ``PresetXL``, or a diffusers-layout SDXL folder (its configs and tokenizers).
    Weights are cast to ``torch_dtype`` (float32 by default, as ``from_pretrained`` does)."""
    _expect_layout(path, "SDXL")
    configs, folder = _architecture_xl(config)
    checkpoint = read_safetensors(path)
    configs["unet"] = with_input_channels(configs["unet"], checkpoint)
    with init_empty_weights():  # no random init of weights about to be replaced
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(configs["text_encoder"])
        text_encoder_2 = CLIPTextModelWithProjection(configs["text_encoder_2"])
    states = {
        "unet": _convert(convert_ldm_unet_checkpoint, checkpoint, configs["unet"], path, config),
        "vae": _convert(convert_ldm_vae_checkpoint, checkpoint, configs["vae"], path, config),
        "text_encoder": _clip_keys_for(text_encoder, _under(checkpoint, XL_CLIP_KEY)),
        "text_encoder_2": hf_from_openclip(_under(checkpoint, XL_OPENCLIP_KEY), text_encoder_2),
    }
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, model in models.items():
        _load_weights(name, model, states[name], torch_dtype or torch.float32, path, config)
    tokenizer, tokenizer_2 = tokenizers_xl(folder, text_encoder.config.max_position_embeddings)
    parts = ComponentsXL(
        **{name: model.eval() for name, model in models.items()},
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=DDPMScheduler.from_config(configs["scheduler"]),
    )
    check_compatible_xl(parts, inpainting=True)  # an inpainting checkpoint loads as one
    return parts


def load_single_file_sd2(path, config, torch_dtype: torch.dtype | None = None) -> Components:
    """The parts of an SD 2.x single-file checkpoint (OpenCLIP ViT-H text encoder) on the architecture
    of ``config``: a diffusers-layout SD 2.x folder or a ``Preset``. The file does not say whether
    the model predicts noise or velocity (2.x-base: epsilon, 2.x 768-v: v_prediction), so the
    scheduler's prediction_type comes from ``config``."""
    _expect_layout(path, "SD 2.x")
    configs, folder = _architecture(config)
    checkpoint = read_safetensors(path)
    configs["unet"] = with_input_channels(configs["unet"], checkpoint)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(configs["unet"])
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    states = {
        "unet": _convert(convert_ldm_unet_checkpoint, checkpoint, configs["unet"], path, config),
        "vae": _convert(convert_ldm_vae_checkpoint, checkpoint, configs["vae"], path, config),
        "text_encoder": hf_from_openclip(_under(checkpoint, SD2_OPENCLIP_KEY), text_encoder),
    }
    models = {"unet": unet, "vae": vae, "text_encoder": text_encoder}
    for name, model in models.items():
        _load_weights(name, model, states[name], torch_dtype or torch.float32, path, config)
    parts = Components(
        **{name: model.eval() for name, model in models.items()},
        tokenizer=load_tokenizer(folder, text_encoder.config.max_position_embeddings),
        scheduler=DDPMScheduler.from_config(configs["scheduler"]),
    )
    check_compatible(parts, inpainting=True)  # an inpainting checkpoint loads as one
    return parts


def _expect_layout(path, layout: str) -> None:
    """Refuse, from the header alone, a file of another layout or none we know."""
    found = detect_layout(read_header(checked_path(path)), path)
    if found != layout:
        loader = {
            "SD 1.x": "load_single_file (or TextToImagePipeline.from_single_file)",
            "SD 2.x": "load_single_file_sd2",
            "SDXL": "load_single_file_xl (or TextToImageXLPipeline.from_single_file)",
        }
        raise ValueError(
            f"{str(path)!r} is an {found} single-file checkpoint, not {layout}: load it with {loader[found]}"
        )


def _convert(converter, checkpoint, config, path, name) -> dict:
    try:  # diffusers' converters index the keys a config implies: a misfit is a KeyError deep inside
        return converter(checkpoint, config)
    except (KeyError, IndexError, ValueError) as e:
        raise ModelFolderError(
            f"the weights in {str(path)!r} do not fit the architecture of config={name!r} ({e!r}); pass "
            "the preset name or model folder the checkpoint was made from"
        ) from None


def _architecture_xl(config) -> tuple[dict, Path | None]:
    """Part configs (diffusers dicts for unet/vae/scheduler, CLIPTextConfigs for the encoders) named by
    ``config``, and the folder they came from (None for a preset)."""
    if isinstance(config, str) and config in PRESETS:
        config = PRESETS[config]
    if isinstance(config, PresetXL):
        configs = {p: config.config(p) for p in ("unet", "vae", "scheduler")}
        for p in ("text_encoder", "text_encoder_2"):
            configs[p] = CLIPTextConfig(**config.config(p))
        return configs, None
    if isinstance(config, (str, Path)) and Path(config).is_dir():
        folder = check_folder_xl(config, weights=False)
        configs = {p: json.loads((folder / p / "config.json").read_text()) for p in ("unet", "vae")}
        configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
        for p in ("text_encoder", "text_encoder_2"):
            configs[p] = CLIPTextConfig.from_pretrained(folder / p, local_files_only=True)
        return configs, folder
    xl = sorted(k for k, v in PRESETS.items() if isinstance(v, PresetXL))
    raise ValueError(
        f"config must be an SDXL preset name {xl} or a diffusers-layout SDXL folder, got {config!r}"
    )


# ---- writing ---------------------------------------------------------------------------------------


def save_single_file_xl(
    unet, vae, text_encoder, text_encoder_2, path, dtype: torch.dtype | None = None
) -> Path:
    """Write SDXL's four models as one SGM-layout ``.safetensors`` checkpoint (SDXL 1.0's key names)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"single-file checkpoints are written as .safetensors, got {str(path)!r}")
    checkpoint = to_original_layout_xl(
        unet.state_dict(), vae.state_dict(), text_encoder.state_dict(), text_encoder_2.state_dict(),
        unet.config, vae.config,
    )  # fmt: skip
    if dtype is not None:
        checkpoint = {k: v.to(dtype) for k, v in checkpoint.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, path)
    return path


def to_original_layout_xl(unet_sd, vae_sd, text_sd, text_2_sd, unet_config, vae_config) -> dict:
    """diffusers/transformers state dicts -> one dict with SGM key names."""
    if unet_config.get("addition_embed_type") != "text_time":
        raise ValueError("the U-Net has no text_time conditioning: not SDXL's; save it with save_single_file")
    added = {k: v for k, v in unet_sd.items() if k.startswith("add_embedding.")}
    rest = {k: v for k, v in unet_sd.items() if k not in added}
    out = to_original_layout(rest, vae_sd, {}, unet_config, vae_config)
    out.update({LDM_UNET_KEY + ADD_EMBEDDING[k]: v for k, v in added.items()})
    out.update({XL_CLIP_KEY + "text_model." + k.removeprefix("text_model."): v for k, v in text_sd.items()})
    out.update({XL_OPENCLIP_KEY + k: v for k, v in openclip_from_hf(text_2_sd).items()})
    return out
