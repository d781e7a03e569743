"""What every sdlite pipeline shares: its parts, loading, saving and the memory switches.

- The parts are diffusers' Stable Diffusion ones: vae, text_encoder, tokenizer, unet, scheduler, and
  the optional safety_checker, feature_extractor (its image preprocessor) and image_encoder (for
  IP-Adapter), each None when absent and saved as diffusers saves them.
- ``from_pretrained`` reads a diffusers-layout folder from local files only (there is no hub), with
  sdlite's DDPM scheduler wherever the folder names diffusers' ``DDPMScheduler``.
- ``save_pretrained`` writes the layout that both sdlite and diffusers' ``StableDiffusionPipeline`` load
  (``sdlite.models.save_components``, the one writer of that layout).
- ``from_single_file`` / ``save_single_file``: original-layout SD 1.x ``.safetensors`` checkpoints.
- diffusers' ``StableDiffusionMixin`` gives ``enable_freeu`` and ``fuse_qkv_projections``. Attention is
  PyTorch's scaled-dot-product attention (diffusers' ``AttnProcessor2_0``) unless a switch changes it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict
from diffusers.pipelines import pipeline_utils
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.utils import is_xformers_available, logging
from diffusers.utils.pil_utils import numpy_to_pil
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.single_file import checked_path, load_single_file, save_single_file
from pipelines.single_file_xl import detect_layout, load_single_file_sd2
from sdlite.ddpm import DDPMScheduler, check_num_train_timesteps
from sdlite.latents import vae_factor
from sdlite.models import PARTS, ModelFolderError, check_folder, read_header, save_components
from sdlite.models_xl import is_xl_folder
from sdlite.tokenizer import load_tokenizer

logger = logging.get_logger(__name__)

# diffusers >= 0.42 calls from_pretrained's dtype argument dtype and warns on torch_dtype.
_DTYPE_KWARG = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"
OPTIONAL_PARTS = ("safety_checker", "feature_extractor", "image_encoder")


def stable_diffusion_scheduler(scheduler):
    """Set steps_offset to 1 and clip_sample to False in ``scheduler``'s config, in place, with a warning.

    diffusers' ``StableDiffusionPipeline`` makes the same two changes to every scheduler it is built
    with, so doing them here keeps the timesteps, and so the images, equal to its own for the same
    components. Latents exceed [-1, 1], so clipping x̂_0 there would be wrong for any latent model.
    """
    if scheduler is None:
        return scheduler
    config = scheduler.config
    changes = {}
    if "steps_offset" in config and config.steps_offset != 1:
        changes["steps_offset"] = 1
    if config.get("clip_sample") is True:
        changes["clip_sample"] = False
    if changes:
        old = {k: config[k] for k in changes}
        logger.warning(
            f"{type(scheduler).__name__} config {old} changed to {changes}, as diffusers' "
            "StableDiffusionPipeline does: fix scheduler/scheduler_config.json to silence this"
        )
        scheduler._internal_dict = FrozenDict({**config, **changes})
    return scheduler


class BasePipeline(DiffusionPipeline, StableDiffusionMixin):
    """A diffusers pipeline over Stable Diffusion's parts (see the module docstring)."""

    model_cpu_offload_seq = "text_encoder->image_encoder->unet->vae"
    _optional_components = list(OPTIONAL_PARTS)
    _exclude_from_cpu_offload = ["safety_checker"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        super().__init__()
        if safety_checker is not None and feature_extractor is None:
            raise ValueError(
                "a safety_checker needs the feature_extractor (CLIPImageProcessor) that prepares its input: "
                "pass both, or safety_checker=None"
            )
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=stable_diffusion_scheduler(scheduler),
            safety_checker=safety_checker,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_to_config(requires_safety_checker=requires_safety_checker)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent along each side (``sdlite.latents.vae_factor``); 8 without a VAE."""
        return vae_factor(self.vae.config) if getattr(self, "vae", None) is not None else 8

    # ---- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> BasePipeline:
        """Load a diffusers-layout folder (sdlite's or diffusers' ``save_pretrained``), local files only.

        A scheduler saved as diffusers' ``DDPMScheduler`` loads as sdlite's (same config keys); other
        scheduler classes load as diffusers' own. A folder without a tokenizer gets CLIP's, built offline.
        diffusers' keyword arguments work as there (``variant``, ``torch_dtype``, a part passed in).
        """
        path = cls._check_folder(pretrained_model_name_or_path, kwargs)
        kwargs.setdefault("local_files_only", True)
        if "scheduler" not in kwargs:
            config = DDPMScheduler.load_config(path / "scheduler")
            check_num_train_timesteps(config.get("num_train_timesteps", 1000))  # before any table is built
            if config.get("_class_name") == "DDPMScheduler":
                kwargs["scheduler"] = DDPMScheduler.from_config(config)
        kwargs = {**cls._default_tokenizers(path, kwargs), **kwargs}
        if "torch_dtype" in kwargs and _DTYPE_KWARG == "dtype":
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def _check_folder(cls, path: str | Path, kwargs: dict) -> Path:
        """The folder, checked to hold this pipeline's parts (those not passed in ``kwargs``)."""
        if is_xl_folder(path):
            raise ModelFolderError(
                f"{str(path)!r} is an SDXL model folder: load it with TextToImageXLPipeline.from_pretrained"
            )
        return check_folder(path, tuple(p for p in PARTS if p not in kwargs))

    @classmethod
    def _default_tokenizers(cls, path: Path, kwargs: dict) -> dict:
        """CLIP's tokenizer, built offline, for a folder without one (and none passed)."""
        if "tokenizer" in kwargs or (path / "tokenizer").is_dir():
            return {}
        text_config = CLIPTextModel.config_class.from_pretrained(path / "text_encoder")
        return {"tokenizer": load_tokenizer(None, text_config.max_position_embeddings)}

    def save_pretrained(
        self,
        save_directory: str | Path,
        safe_serialization: bool = True,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        **kwargs,
    ) -> Path:
        """Write the diffusers layout; it loads here and in diffusers' ``StableDiffusionPipeline``.

        ``variant`` ("fp16", ...) names the weight files ``<name>.<variant>.safetensors``, which
        ``from_pretrained(path, variant=...)`` reads. Nothing is pushed anywhere (no hub).
        """
        if kwargs.get("push_to_hub"):
            raise ValueError("save_pretrained(push_to_hub=True): sdlite never uploads; push the folder")
        kwargs.pop("push_to_hub", None)
        if kwargs:
            raise ValueError(
                "save_pretrained takes save_directory, safe_serialization, variant and max_shard_size, "
                f"not {sorted(kwargs)}"
            )
        parts = {name: getattr(self, name, None) for name in (*PARTS, *OPTIONAL_PARTS)}
        return save_components(
            parts,
            save_directory,
            safe_serialization=safe_serialization,
            variant=variant,
            max_shard_size=max_shard_size,
            requires_safety_checker=self.config.get("requires_safety_checker", False),
        )

    def run_safety_checker(self, images: torch.Tensor):
        """(images, flags): diffusers' safety checker over (N, 3, H, W) images in [0, 1]; flags is None
        without one (sdlite's models ship none; a diffusers folder may hold one)."""
        if getattr(self, "safety_checker", None) is None:
            return images, None
        pil = numpy_to_pil(images.cpu().permute(0, 2, 3, 1).float().numpy())
        clip_input = self.feature_extractor(pil, return_tensors="pt").pixel_values
        checked, flags = self.safety_checker(
            images=images, clip_input=clip_input.to(images.device, self.safety_checker.dtype)
        )
        return torch.as_tensor(checked, device=images.device, dtype=images.dtype), flags

    @classmethod
    def from_single_file(
        cls, path: str | Path, config="sd15", torch_dtype: torch.dtype | None = None
    ) -> BasePipeline:
        """Load an original-layout (CompVis) SD 1.x or SD 2.x ``.safetensors`` checkpoint.

        ``config`` gives the architecture, since a checkpoint holds only weights: a preset name
        (default ``"sd15"``) or a diffusers-layout folder whose configs (and tokenizer) to use. An SD
        2.x file needs the folder of an SD 2.x model (its OpenCLIP text encoder, and whether it
        predicts noise or velocity, which the file does not say).
        """
        layout = detect_layout(read_header(checked_path(path)), path)
        if layout == "SDXL":
            raise ValueError(f"{str(path)!r} is an SDXL checkpoint: load it with TextToImageXLPipeline")
        load = load_single_file_sd2 if layout == "SD 2.x" else load_single_file
        return cls(**load(path, config, torch_dtype).as_dict())

    def save_single_file(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the U-Net, VAE and text encoder as one original-layout ``.safetensors`` checkpoint."""
        return save_single_file(self.unet, self.vae, self.text_encoder, path, dtype)

    # ---- memory and speed switches -----------------------------------------------------------

    def enable_xformers_memory_efficient_attention(self, attention_op: Callable | None = None) -> None:
        """xFormers attention in the U-Net and VAE (PyTorch's SDPA is the default and needs no switch)."""
        if not is_xformers_available():
            raise ImportError(
                "enable_xformers_memory_efficient_attention() needs the xformers package, which is not "
                "installed: pip install sdlite[xformers] (PyTorch's scaled-dot-product attention, the "
                "default, is as memory-efficient on recent PyTorch)"
            )
        super().enable_xformers_memory_efficient_attention(attention_op)

    def enable_vae_slicing(self) -> None:
        """Decode a batch one image at a time: less memory for large batches."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self) -> None:
        self.vae.disable_slicing()

    def enable_vae_tiling(self) -> None:
        """Decode large images in overlapping tiles, blended at the seams: memory bounded by tile size."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self) -> None:
        self.vae.disable_tiling()

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str | None = None):
        """Keep each model on the CPU and move it to the accelerator only while it runs (needs one)."""
        if device is None and not (torch.cuda.is_available() or torch.backends.mps.is_available()):
            raise RuntimeError(
                "enable_model_cpu_offload() moves each model to a GPU only while it runs, and this "
                "machine has no GPU; on a CPU-only machine leave it off (the models already live in RAM)"
            )
        super().enable_model_cpu_offload(gpu_id=gpu_id, device=device)
