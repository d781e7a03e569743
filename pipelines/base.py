"""What every sdlite pipeline shares: loading, saving and the memory switches.

- ``from_pretrained`` reads a diffusers-layout folder from local files only (there is no hub), with
  sdlite's DDPM scheduler wherever the folder names diffusers' ``DDPMScheduler``.
- ``save_pretrained`` writes the layout that both sdlite and diffusers' ``StableDiffusionPipeline`` load.
- ``from_single_file`` / ``save_single_file``: original-layout SD 1.x ``.safetensors`` checkpoints.
- Attention is PyTorch's scaled-dot-product attention (diffusers' ``AttnProcessor2_0``) unless one of
  the switches here, or diffusers' ``enable_attention_slicing``, changes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines import pipeline_utils
from diffusers.utils import is_xformers_available
from transformers import CLIPTextModel, CLIPTokenizer

from sdlite.ddpm import DDPMScheduler
from sdlite.models import PARTS, Components, check_folder, save_components
from sdlite.pipelines.single_file import load_single_file, save_single_file
from sdlite.tokenizer import load_tokenizer

# diffusers >= 0.42 calls from_pretrained's dtype argument dtype and warns on torch_dtype.
_DTYPE_KWARG = "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


class BasePipeline(DiffusionPipeline):
    """A diffusers pipeline over sdlite's parts: vae, text_encoder, tokenizer, unet, scheduler."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
        )

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent: each VAE block but the last halves the size."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- loading and saving ------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> BasePipeline:
        """Load a diffusers-layout folder (sdlite's or diffusers' ``save_pretrained``), local files only.

        A scheduler saved as diffusers' ``DDPMScheduler`` loads as sdlite's (same config keys); other
        scheduler classes load as diffusers' own. A folder without a tokenizer gets CLIP's, built offline.
        """
        path = check_folder(pretrained_model_name_or_path, tuple(p for p in PARTS if p not in kwargs))
        kwargs.setdefault("local_files_only", True)
        if "scheduler" not in kwargs:
            config = DDPMScheduler.load_config(path / "scheduler")
            if config.get("_class_name") == "DDPMScheduler":
                kwargs["scheduler"] = DDPMScheduler.from_config(config)
        if "tokenizer" not in kwargs and not (path / "tokenizer").is_dir():
            text_config = CLIPTextModel.config_class.from_pretrained(path / "text_encoder")
            kwargs["tokenizer"] = load_tokenizer(None, text_config.max_position_embeddings)
        if "torch_dtype" in kwargs and _DTYPE_KWARG == "dtype":
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory: str | Path, safe_serialization: bool = True, **kwargs) -> Path:
        """Write the diffusers layout; it loads here and in diffusers' ``StableDiffusionPipeline``."""
        if kwargs:
            raise ValueError(
                f"save_pretrained takes save_directory and safe_serialization, not {sorted(kwargs)}"
            )
        parts = Components(**{name: getattr(self, name) for name in PARTS})
        path = save_components(parts, save_directory, safe_serialization=safe_serialization)
        if not isinstance(self.scheduler, DDPMScheduler):
            # model_index.json must name the class diffusers builds from scheduler/ (sdlite's
            # save_components always writes diffusers' DDPMScheduler, whose config ours shares).
            index_file = path / "model_index.json"
            index = json.loads(index_file.read_text())
            cls = type(self.scheduler)
            index["scheduler"] = [cls.__module__.split(".")[0], cls.__name__]
            index_file.write_text(json.dumps(index, indent=2) + "\n")
        return path

    @classmethod
    def from_single_file(
        cls, path: str | Path, config="sd15", torch_dtype: torch.dtype | None = None
    ) -> BasePipeline:
        """Load an original-layout (CompVis) SD 1.x ``.safetensors`` checkpoint.

        ``config`` gives the architecture, since a checkpoint holds only weights: a preset name
        (default ``"sd15"``) or a diffusers-layout folder whose configs (and tokenizer) to use.
        """
        return cls(**load_single_file(path, config, torch_dtype).as_dict())

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
