"""``sdlite generate``: images for a prompt, from a model folder or a single-file checkpoint, with any
of diffusers' samplers and any number of LoRA adapters, each at its own scale (``--lora FILE:SCALE``,
or ``--scale`` for those given without one)."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from pipelines.text_to_image import TextToImagePipeline
from pipelines.text_to_image_xl import TextToImageXLPipeline
from sdlite.images import grid
from sdlite.models_xl import is_xl_folder
from training.schedulers import make_scheduler


def load_pipeline(model: str, model_config: str = "sd15") -> TextToImagePipeline:
    """The text-to-image pipeline (SD or SDXL) of a model folder, or of a single-file ``.safetensors``
    checkpoint on the architecture ``model_config`` names (a preset or a model folder); quiet (no
    progress bars)."""
    diffusers_logging.disable_progress_bar()  # loading bars: the command prints what it wrote
    transformers_logging.disable_progress_bar()
    path = Path(model)
    if path.is_file() or path.suffix == ".safetensors":  # the loader refuses pickles and says why
        config = model_config if Path(model_config).is_dir() else model_config.lower()
        pipe = TextToImagePipeline.from_single_file(path, config=config)
    elif is_xl_folder(path):
        pipe = TextToImageXLPipeline.from_pretrained(path)
    else:
        pipe = TextToImagePipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_loras(pipe: TextToImagePipeline, loras: list[tuple[str, float]]) -> None:
    """Load each (path, scale) as an adapter of its own and run them all, each at its scale."""
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        if Path(path).is_file() and Path(path).suffix != ".safetensors":
            raise ValueError(
                f"--lora {path!r}: LoRA weights are read from .safetensors files only; a pickled file "
                "(.bin, .pt, .ckpt) can run code when loaded, so it is refused"
            )
        try:
            with warnings.catch_warnings():  # peft warns at a second adapter; several are what we asked
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                # use_safetensors=True: never fall back to unpickling a .bin that sits beside it.
                pipe.load_lora_weights(path, adapter_name=name, use_safetensors=True, local_files_only=True)
        except (OSError, SafetensorError, KeyError, RuntimeError) as e:
            raise ValueError(
                f"--lora {path!r} is not LoRA weights this model can load ({' '.join(str(e).split())}); "
                "give a training run's final/ folder (it holds pytorch_lora_weights.safetensors) or a "
                "LoRA .safetensors file made for this model"
            ) from None
    pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])


def run(args: argparse.Namespace) -> int:
    pipe = load_pipeline(args.model, args.model_config)
    scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    if scheduler is not None:
        pipe.scheduler = scheduler
    if args.lora:
        default = 1.0 if args.scale is None else args.scale
        load_loras(pipe, [(path, default if scale is None else scale) for path, scale in args.lora])
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_interval=args.guidance_interval,
        num_images_per_prompt=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        output_type="np",
    ).images
    rows = 1 if len(images) <= 8 else int(len(images) ** 0.5)
    image = grid(images, rows=rows, scale=args.upscale)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"wrote {out} ({len(images)} image{'s' if len(images) > 1 else ''}, {image.width}x{image.height})")
    return 0
