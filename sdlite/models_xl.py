"""The parts of a Stable Diffusion XL model: build them from a preset, save and load a folder.

The folder is diffusers' SDXL layout (``model_index.json`` naming ``StableDiffusionXLPipeline``, and
vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, unet/, scheduler/), so what we save
loads in diffusers and an SDXL folder a user has on disk loads here. Weights are read from
safetensors only and nothing is fetched from a hub.

A folder is checked from its configs and safetensors headers before any weight is read: a folder
assembled from an SD 1.x/2.x model and an SDXL one fails naming which part is which.

SDXL's refiner is a folder without text_encoder/ and tokenizer/: its U-Net reads text encoder 2's
states alone and is conditioned on an aesthetic score (``requires_aesthetics_score``). Only the
image-to-image pipelines draw with it, so ``check_folder_xl`` lets it through when asked
(``refiner=True``) and otherwise names where it loads.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from sdlite.ddpm import DDPMScheduler
from sdlite.models import LIBRARY_CLASS, ModelFolderError, check_folder, read_header, read_pickled_shapes
from sdlite.presets import SIZE_CONDITIONS, PresetXL, get_preset
from sdlite.tokenizer import clip_tokenizer

PARTS_XL = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "scheduler")
LIBRARY_CLASS_XL = {
    **{k: v for k, v in LIBRARY_CLASS.items() if k != "safety_checker"},  # SDXL has no safety checker
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}
SAFETENSORS = (".safetensors", ".safetensors.index.json")  # one file, or shards and their index
SD_PARTS = ("vae", "unet", "text_encoder", "scheduler")  # what sdlite.models.check_folder checks
WEIGHTS = {"vae": "diffusion_pytorch_model", "unet": "diffusion_pytorch_model", "text_encoder": "model",
           "text_encoder_2": "model"}  # fmt: skip
PICKLED = {"vae": "diffusion_pytorch_model.bin", "unet": "diffusion_pytorch_model.bin",
           "text_encoder": "pytorch_model.bin", "text_encoder_2": "pytorch_model.bin"}  # fmt: skip


@dataclass
class ComponentsXL:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel  # CLIP ViT-L: penultimate hidden states
    text_encoder_2: CLIPTextModelWithProjection  # OpenCLIP ViT-bigG: penultimate states + pooled projection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer  # the same BPE, padded with "!" (id 0) as OpenCLIP pads
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler
    # The pipeline's unconditional half with no negative prompt: zeros (SDXL base was trained to take
    # them), or the empty prompt's embeddings (what sdlite's trainer and diffusers' drop captions to).
    force_zeros_for_empty_prompt: bool = True

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in PARTS_XL}

    def save_pretrained(self, path: str | Path) -> Path:
        return save_components_xl(self, path)


def openclip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """SDXL's second tokenizer: CLIP's vocabulary, padded with "!" (id 0) as OpenCLIP's tokenizer
    pads, so encoder 2 sees the token ids it was trained on after the end of the prompt."""
    tokenizer = clip_tokenizer(model_max_length)
    tokenizer.pad_token = "!"
    return tokenizer


def _xl_preset(preset: str | PresetXL) -> PresetXL:
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if not isinstance(preset, PresetXL):
        raise ValueError(
            f"preset {preset.name!r} is an SD 1.x-style preset with one text encoder (build it with "
            "build_components); SDXL needs a preset with text_encoder_2 such as 'sdxl' or 'tiny-sdxl'"
        )
    return preset


def build_components_xl(
    preset: str | PresetXL = "tiny-sdxl", seed: int | None = 0, device: str | torch.device | None = None
) -> ComponentsXL:
    """Random-weight SDXL parts of a preset; ``seed`` makes the initialisation reproducible.

    device: build the models there directly; "meta" gives their shapes and parameter counts without
    allocating a byte of weights (SDXL's are 13 GB in float32).
    """
    preset = _xl_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device) if device is not None else nullcontext():
        vae = AutoencoderKL(**preset.config("vae"))
        text_encoder = CLIPTextModel(CLIPTextConfig(**preset.config("text_encoder")))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.config("text_encoder_2")))
        unet = UNet2DConditionModel(**preset.config("unet"))
    return ComponentsXL(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(preset.max_length),
        tokenizer_2=openclip_tokenizer(preset.max_length),
        unet=unet,
        scheduler=DDPMScheduler(**preset.config("scheduler")),
    )


def save_components_xl(parts: ComponentsXL, path: str | Path) -> Path:
    """Write a diffusers-layout SDXL folder (safetensors weights) that StableDiffusionXLPipeline loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in PARTS_XL:
        part = getattr(parts, name)
        if name in WEIGHTS:
            part.save_pretrained(path / name, safe_serialization=True)
        else:
            part.save_pretrained(path / name)
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers.__version__}
    index.update(LIBRARY_CLASS_XL)
    scheduler = type(parts.scheduler)
    if scheduler.__module__.startswith("diffusers."):  # another diffusers scheduler: record it as itself
        index["scheduler"] = ["diffusers", scheduler.__name__]
    index["force_zeros_for_empty_prompt"] = bool(parts.force_zeros_for_empty_prompt)
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


# ---- checking a folder before loading it -----------------------------------------------------------


def _read_json(file: Path) -> dict | None:
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except json.JSONDecodeError as e:
        raise ModelFolderError(
            f"{str(file)!r} is not valid JSON ({e}); restore it from the model's source"
        ) from None


def _kinds(path: Path) -> tuple[list[str], list[str]]:
    """What each part of a folder says it is: (SD 1.x/2.x findings, SDXL findings)."""
    index = _read_json(path / "model_index.json") or {}
    unet = _read_json(path / "unet" / "config.json") or {}
    te2 = _read_json(path / "text_encoder_2" / "config.json")
    sd, xl = [], []
    kind = index.get("_class_name")
    if kind:
        (xl if "XL" in kind else sd).append(f"model_index.json names {kind}")
    if unet:
        if unet.get("addition_embed_type") == "text_time":
            xl.append(
                f"unet/ has SDXL's text_time conditioning (cross_attention_dim {unet['cross_attention_dim']})"
            )
        else:
            sd.append(f"unet/ is an SD 1.x/2.x U-Net (cross_attention_dim {unet.get('cross_attention_dim')}, "
                      "no text_time conditioning)")  # fmt: skip
    if te2 is None:
        sd.append("there is no text_encoder_2/")
    elif "CLIPTextModelWithProjection" not in te2.get("architectures", ["CLIPTextModelWithProjection"]):
        sd.append(f"text_encoder_2/ is a {te2['architectures'][0]} without SDXL's pooled projection")
    else:
        xl.append("text_encoder_2/ is present")
    return sd, xl


def is_refiner_folder(path: str | Path) -> bool:
    """True for an SDXL refiner's folder: no text_encoder/, and a U-Net whose cross-attention reads
    text_encoder_2's states alone. (A base model that lost its text_encoder/ is not one: its U-Net
    still reads both encoders' widths, and check_folder_xl names the missing part.)"""
    path = Path(path)
    unet = _read_json(path / "unet" / "config.json") or {}
    te2 = _read_json(path / "text_encoder_2" / "config.json") or {}
    return (
        not (path / "text_encoder" / "config.json").is_file()
        and "hidden_size" in te2
        and unet.get("cross_attention_dim") == te2["hidden_size"]
    )


def check_folder_xl(
    path: str | Path, weights: bool = True, pickled: bool = False, refiner: bool = False
) -> Path:
    """Fail early, naming what was found and what was expected, when a folder is not a whole SDXL
    model: a half SD 1.x / half SDXL folder, widths that do not fit, a missing part or weight file,
    pickled-only weights, or weights that do not fit a config. Reads configs and headers only;
    ``weights=False`` checks a folder of configs alone (the architecture of a single-file load).
    ``pickled=True`` also takes torch.save weight files (``save_pretrained(safe_serialization=False)``)
    that unpickle with ``weights_only`` (tensors only), as the SD pipeline's folders do.
    ``refiner=True`` also takes a refiner's folder (``is_refiner_folder``), checked the same way
    without text_encoder/; without it such a folder fails naming the pipelines that load it."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(f"SDXL model folder {str(path)!r} does not exist")
    sd, xl = _kinds(path)
    if sd and xl:
        raise ModelFolderError(
            f"model folder {str(path)!r} is half SD 1.x/2.x and half SDXL: {'; '.join(sd)}; but "
            f"{'; '.join(xl)}. Expected every part from one SDXL model (a text_time U-Net whose "
            "cross_attention_dim is text_encoder's width + text_encoder_2's, and text_encoder_2/ a "
            "CLIPTextModelWithProjection); copy the missing parts from the model the others came from"
        )
    if not xl:
        raise ModelFolderError(
            f"model folder {str(path)!r} is not SDXL ({'; '.join(sd)}): load it with "
            "sdlite.models.load_components, which reads SD 1.x/2.x folders"
        )
    is_refiner = is_refiner_folder(path)
    if is_refiner and not refiner:
        raise ModelFolderError(
            f"{str(path)!r} is an SDXL refiner (text_encoder_2 alone, no text_encoder/): it redraws images, "
            "so load it with ImageToImageXLPipeline or InpaintXLPipeline.from_pretrained"
        )
    sd_parts = tuple(p for p in SD_PARTS if not (is_refiner and p == "text_encoder"))
    parts = (*sd_parts, "text_encoder_2")
    for name in parts:
        file = path / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not file.is_file():
            raise ModelFolderError(
                f"SDXL model folder {str(path)!r} has no {name}: expected {name}/{file.name} (an SDXL folder "
                "has vae/, unet/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)"
            )
    unet = _read_json(path / "unet" / "config.json")
    te1, te2 = (
        _read_json(path / "text_encoder" / "config.json"),
        _read_json(path / "text_encoder_2" / "config.json"),
    )
    _check_widths(str(path), unet, te1, te2)
    if weights:
        for name, stem in ((n, WEIGHTS[n]) for n in parts if n in WEIGHTS):
            folder = path / name
            if pickled and (folder / PICKLED[name]).is_file():
                continue
            if not any((folder / f"{stem}{ext}").is_file() for ext in SAFETENSORS):
                raise ModelFolderError(
                    f"{str(folder)!r} has no {stem}.safetensors; sdlite reads SDXL weights from safetensors "
                    "only (a pickled .bin can run code when loaded): save the model again with safetensors"
                )
        check_folder(path, sd_parts)  # the SD parts' weights fit their configs
        _check_text_encoder_2_weights(path / "text_encoder_2")
    return path


def _check_widths(where: str, unet, te1, te2) -> None:
    """The U-Net reads both encoders' states concatenated and encoder 2's pooled projection. (A
    refiner's, te1 None, reads encoder 2's states alone, which is what made it one.)"""
    widths = te2["hidden_size"] + (te1["hidden_size"] if te1 is not None else 0)
    if te1 is not None and unet["cross_attention_dim"] != widths:
        raise ModelFolderError(
            f"{where}: unet.cross_attention_dim is {unet['cross_attention_dim']} but the text encoders' "
            f"widths add up to {te1['hidden_size']} + {te2['hidden_size']} = {widths}: the U-Net and the "
            "text encoders come from different models"
        )
    added = SIZE_CONDITIONS * unet["addition_time_embed_dim"] + te2["projection_dim"]
    refiner = added - unet["addition_time_embed_dim"]  # (size, crop, aesthetic score): five numbers
    if unet["projection_class_embeddings_input_dim"] not in (added, refiner):
        raise ModelFolderError(
            f"{where}: unet.projection_class_embeddings_input_dim is "
            f"{unet['projection_class_embeddings_input_dim']} but {SIZE_CONDITIONS} size/crop numbers x "
            f"{unet['addition_time_embed_dim']} + text_encoder_2.projection_dim {te2['projection_dim']} = "
            f"{added}: the U-Net and text_encoder_2 come from different models"
        )


def _check_text_encoder_2_weights(folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    files = (
        sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [folder / "model.safetensors"]
    )
    if not files[0].is_file() and (folder / PICKLED["text_encoder_2"]).is_file():  # pickled=True only
        found = read_pickled_shapes(folder / PICKLED["text_encoder_2"]) or {}
    else:
        found = {k: v for file in files for k, v in read_header(file).items()}
    try:
        with torch.device("meta"):
            model = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(folder, local_files_only=True))
    except Exception as e:  # a hand-edited or foreign config fails in many ways inside transformers
        raise ModelFolderError(
            f"{str(folder / 'config.json')!r} does not describe a text encoder: {e}"
        ) from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for key, shape in want.items():
        if key in found and found[key] != shape:
            raise ModelFolderError(
                f"{str(folder)!r}: tensor {key!r} has shape {found[key]} but text_encoder_2's config makes "
                f"it {shape}: the weights and config.json come from different models"
            )
    missing = sorted(want.keys() - found.keys())
    if missing:
        raise ModelFolderError(
            f"{str(folder)!r} lacks {len(missing)} of text_encoder_2's tensors, e.g. {missing[:3]}: the "
            "weight file is incomplete or is not a CLIPTextModelWithProjection's"
        )


# ---- loading ---------------------------------------------------------------------------------------


def load_components_xl(
    path: str | Path, torch_dtype: torch.dtype | None = None, inpainting: bool = False
) -> ComponentsXL:
    """Load every part of a diffusers-layout SDXL folder from local safetensors only, checked first
    (check_folder_xl) and after (check_compatible_xl; ``inpainting``: an inpainting U-Net fits too)."""
    path = check_folder_xl(path)
    kw = dict(local_files_only=True, use_safetensors=True)
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    tf_dtype = {} if torch_dtype is None else {"dtype": torch_dtype}
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw, **tf_dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw, **tf_dtype)
    tokenizers = tokenizers_xl(path, text_encoder.config.max_position_embeddings)
    parts = ComponentsXL(
        vae=AutoencoderKL.from_pretrained(path / "vae", **kw, **dtype),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1],
        unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw, **dtype),
        scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
        force_zeros_for_empty_prompt=(_read_json(path / "model_index.json") or {}).get(
            "force_zeros_for_empty_prompt",
            True,  # diffusers' default
        ),
    )
    check_compatible_xl(parts, inpainting)
    return parts


def tokenizers_xl(path: str | Path | None, model_max_length: int = 77) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """A folder's own tokenizer/ and tokenizer_2/, else those built offline from CLIP's shipped BPE."""
    found = []
    for name, build in (("tokenizer", clip_tokenizer), ("tokenizer_2", openclip_tokenizer)):
        folder = Path(path) / name if path is not None else None
        if folder and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
            found.append(CLIPTokenizer.from_pretrained(folder, local_files_only=True))
        else:
            found.append(build(model_max_length))
    return found[0], found[1]


def check_compatible_xl(parts: ComponentsXL, inpainting: bool = False) -> None:
    """The parts must fit: latent channels, both encoders' widths, the added embedding, tokenizers."""
    vae, unet = parts.vae.config, parts.unet.config
    te1, te2 = parts.text_encoder.config, parts.text_encoder_2.config
    # inpainting: a U-Net that also reads the mask and the masked image's latents (2 C + 1) fits too
    fits = (vae.latent_channels, 2 * vae.latent_channels + 1) if inpainting else (vae.latent_channels,)
    if unet.in_channels not in fits:
        raise ModelFolderError(
            f"unet.in_channels is {unet.in_channels} but the VAE makes {vae.latent_channels}-channel "
            "latents: the U-Net and VAE come from different models"
        )
    _check_widths("SDXL parts", dict(unet), te1.to_dict(), te2.to_dict())
    for tok, te, name in ((parts.tokenizer, te1, "text_encoder"), (parts.tokenizer_2, te2, "text_encoder_2")):
        if len(tok) > te.vocab_size:
            raise ModelFolderError(
                f"a tokenizer has {len(tok)} tokens but {name} embeds only {te.vocab_size}: the tokenizer "
                "and text encoder come from different models"
            )
    if parts.tokenizer.model_max_length != parts.tokenizer_2.model_max_length:
        raise ModelFolderError(
            f"tokenizer pads to {parts.tokenizer.model_max_length} tokens but tokenizer_2 to "
            f"{parts.tokenizer_2.model_max_length}: both encoders' states are concatenated token by "
            "token, so both tokenizers need one model_max_length"
        )


def is_xl_folder(path: str | Path) -> bool:
    """True when a folder says it is SDXL in any part (then load_components_xl reads or refuses it)."""
    path = Path(path)
    return path.is_dir() and bool(_kinds(path)[1])
