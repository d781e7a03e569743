"""The parts of a latent text-to-image model: build them from a preset, save and load a folder.

The folder is diffusers' layout (``model_index.json`` plus one subfolder per part), so what we save
loads in diffusers' ``StableDiffusionPipeline`` and a Stable Diffusion 1.x/2.x folder that a user has
on disk loads here. Nothing is ever fetched from a hub: every load is ``local_files_only``.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors import SafetensorError, safe_open
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from sdlite.ddpm import DDPMScheduler
from sdlite.presets import Preset, get_preset
from sdlite.tokenizer import clip_tokenizer, load_tokenizer

PARTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
# model_index.json entries: the library and class diffusers' StableDiffusionPipeline loads each
# part with. The scheduler is recorded as diffusers' DDPMScheduler, whose config ours shares.
LIBRARY_CLASS = {
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
}
# The config file of each part in a diffusers-layout folder (the tokenizer's are optional).
CONFIG_FILES = {
    "vae": "config.json",
    "unet": "config.json",
    "text_encoder": "config.json",
    "scheduler": "scheduler_config.json",
}


class ModelFolderError(ValueError):
    """A model folder that is missing a part or whose parts do not fit together."""


@dataclass
class Components:
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    unet: UNet2DConditionModel
    scheduler: DDPMScheduler

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in PARTS}

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True, variant: str | None = None):
        return save_components(self, path, safe_serialization=safe_serialization, variant=variant)


def build_components(preset: str | Preset = "tiny", seed: int | None = 0) -> Components:
    """Random-weight parts of a preset; ``seed`` makes the initialisation reproducible."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if seed is not None:
        torch.manual_seed(seed)
    return Components(
        vae=AutoencoderKL(**preset.config("vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**preset.config("text_encoder"))),
        tokenizer=clip_tokenizer(preset.max_length),
        unet=UNet2DConditionModel(**preset.config("unet")),
        scheduler=DDPMScheduler(**preset.config("scheduler")),
    )


def save_components(
    parts: Components | Mapping[str, Any],
    path: str | Path,
    safe_serialization: bool = True,
    variant: str | None = None,
    max_shard_size: int | str | None = None,
    requires_safety_checker: bool = False,
) -> Path:
    """Write a diffusers-layout folder: one subfolder per part and ``model_index.json``.

    ``parts`` is a Components or a name -> part mapping that may add diffusers' optional parts
    (safety_checker, feature_extractor, image_encoder), None when absent (recorded as [null, null]).
    ``variant`` ("fp16", ...) names the weight files ``<name>.<variant>.safetensors``.
    """
    parts = parts.as_dict() if isinstance(parts, Components) else dict(parts)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__}
    index.update(LIBRARY_CLASS)
    for name, part in parts.items():
        if part is None:
            continue
        if isinstance(part, torch.nn.Module):  # the models: weights (optionally a variant) and config
            weights = dict(safe_serialization=safe_serialization, variant=variant)
            if max_shard_size is not None:
                weights["max_shard_size"] = max_shard_size
            part.save_pretrained(path / name, **weights)
        else:  # tokenizer, scheduler, image processor: configuration files only
            part.save_pretrained(path / name)
        cls = type(part)
        if name == "scheduler" and cls.__module__.startswith("sdlite."):
            continue  # sdlite's DDPM is recorded as diffusers' DDPMScheduler, whose config it shares
        if name not in ("vae", "text_encoder", "tokenizer", "unet"):  # those keep their base class
            index[name] = [cls.__module__.split(".")[0], cls.__name__]
    index["requires_safety_checker"] = requires_safety_checker
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def check_folder(path: str | Path, parts: tuple[str, ...] = PARTS) -> Path:
    """Fail early, naming the part, when a model folder lacks one of ``parts`` or a part's weights do
    not fit its config (check_weights)."""
    path = Path(path)
    if not path.is_dir():
        raise ModelFolderError(
            f"model folder {str(path)!r} does not exist; pass a folder saved by "
            "sdlite or diffusers (it holds model_index.json)"
        )
    for name in parts:
        if name == "tokenizer":
            continue  # a missing tokenizer is rebuilt offline from CLIP's vocabulary
        if not (path / name / CONFIG_FILES[name]).is_file():
            raise ModelFolderError(
                f"model folder {str(path)!r} has no {name}: expected {name}/{CONFIG_FILES[name]} "
                "(a diffusers-layout folder has vae/, unet/, text_encoder/, tokenizer/, scheduler/)"
            )
    for name in parts:
        if name in WEIGHT_FILES:
            check_weights(path, name)
    return path


# The weight files from_pretrained reads: safetensors, else pickled .bin files, which diffusers and
# transformers read with torch.load(weights_only=True), as check_weights does first.
WEIGHT_FILES = {
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin"),
}


def read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a .safetensors header, without reading the tensors."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ModelFolderError(
            f"{str(file)!r} is not a readable safetensors file ({e}): truncated by an interrupted copy "
            "or download, or not safetensors at all; copy it again"
        ) from None


def unpickling_refusal(error: Exception) -> str:
    """The line of torch's weights_only refusal that names what a file tried to unpickle ("" if none)."""
    lines = [line for line in str(error).splitlines() if "unsupported" in line.lower()]
    return lines[0].strip() if lines else ""


def read_pickled_shapes(file: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from a torch.save file, unpickled weights_only and memory-mapped (the
    tensors stay on disk); None for the legacy format, which cannot be mapped."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ModelFolderError(
            f"{str(file)!r} holds pickled objects other than tensors ({unpickling_refusal(e) or e}); "
            "refused, because unpickling them could run code. Use a safetensors copy of the model"
        ) from None
    except RuntimeError:
        return None
    return {k: tuple(v.shape) for k, v in state.items() if isinstance(v, torch.Tensor)}


def expected_shapes(folder: Path, name: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of the part that ``folder``'s config describes (built on the meta device)."""
    try:
        with torch.device("meta"):
            if name == "text_encoder":
                model = CLIPTextModel(CLIPTextConfig.from_pretrained(folder, local_files_only=True))
            else:
                cls = AutoencoderKL if name == "vae" else UNet2DConditionModel
                model = cls.from_config(cls.load_config(folder, local_files_only=True))
    except Exception as e:  # a hand-edited or foreign config fails in many ways inside the libraries
        raise ModelFolderError(f"{str(folder / 'config.json')!r} does not describe a {name}: {e}") from None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_weights(path: str | Path, name: str) -> None:
    """Fail naming the part, the tensor and both shapes when a part's weight file does not fit its
    config, or lack tensors it needs; rather than a stack trace from deep inside from_pretrained."""
    folder = Path(path) / name
    found: dict[str, tuple[int, ...]] = {}
    for weights, read in zip(WEIGHT_FILES[name], (read_header, read_pickled_shapes)):
        index = folder / f"{weights}.index.json"
        if index.is_file():  # sharded
            files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
        elif (folder / weights).is_file():
            files = [folder / weights]
        else:
            continue
        for file in files:
            found.update(read(file) or {})
        break
    if not found:
        return  # no weight file we know (from_pretrained says so), or a legacy pickle
    # transformers >= 5 names the text encoder's weights without the text_model. of older files
    norm = lambda key: key.removeprefix("text_model.")
    found = {norm(k): (v, k) for k, v in found.items()}
    want = {norm(k): v for k, v in expected_shapes(folder, name).items()}
    for key, shape in want.items():
        if key in found and found[key][0] != shape:
            raise ModelFolderError(
                f"{str(folder)!r}: tensor {found[key][1]!r} has shape {found[key][0]} but {name}'s config "
                f"makes it {shape}: the weights and config.json come from different models"
            )
    missing = sorted(want.keys() - found.keys())
    if missing and not (found.keys() - want.keys()):  # with extra keys too: older names, converted on load
        raise ModelFolderError(
            f"{str(folder)!r} lacks {len(missing)} of the {name}'s tensors, e.g. {missing[:3]} "
            f"(shape {want[missing[0]]}): the weight file is incomplete or belongs to a smaller model"
        )


def load_components(
    path: str | Path, torch_dtype: torch.dtype | None = None, inpainting: bool = False
) -> Components:
    """Load every part of a diffusers-layout folder from local files only, checked first (check_folder)
    and after (check_compatible; ``inpainting``: an inpainting U-Net fits too)."""
    path = check_folder(path)
    kw = dict(local_files_only=True)
    if torch_dtype is not None:
        kw["torch_dtype"] = torch_dtype
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
    parts = Components(
        vae=AutoencoderKL.from_pretrained(path / "vae", **kw),
        text_encoder=text_encoder,
        tokenizer=load_tokenizer(path, text_encoder.config.max_position_embeddings),
        unet=UNet2DConditionModel.from_pretrained(path / "unet", **kw),
        scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
    )
    check_compatible(parts, inpainting)
    return parts


def check_compatible(parts: Components, inpainting: bool = False) -> None:
    """The parts must fit: latent channels, cross-attention width, token vocabulary."""
    vae, unet, te = parts.vae.config, parts.unet.config, parts.text_encoder.config
    # inpainting: a U-Net that also reads the mask and the masked image's latents (2 C + 1) fits too
    fits = (vae.latent_channels, 2 * vae.latent_channels + 1) if inpainting else (vae.latent_channels,)
    if unet.in_channels not in fits:
        raise ModelFolderError(
            f"unet.in_channels is {unet.in_channels} but the VAE makes {vae.latent_channels}-channel "
            "latents: the U-Net and VAE come from different models"
        )
    if unet.cross_attention_dim != te.hidden_size:
        raise ModelFolderError(
            f"unet.cross_attention_dim is {unet.cross_attention_dim} but the text encoder's width is "
            f"{te.hidden_size}: the U-Net and text encoder come from different models"
        )
    if len(parts.tokenizer) > te.vocab_size:
        raise ModelFolderError(
            f"the tokenizer has {len(parts.tokenizer)} tokens but the text encoder embeds only "
            f"{te.vocab_size}: the tokenizer and text encoder come from different models"
        )
