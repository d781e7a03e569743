"""``sdlite generate``: images for a prompt, from a model folder or a single-file checkpoint, with any
of diffusers' samplers and any number of LoRA adapters, each at its own scale (``--lora FILE:SCALE``,
or ``--scale`` for those given without one); from a picture with ``--image`` (and ``--strength``),
repainting where ``--mask`` is white."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from safetensors import SafetensorError
from transformers.utils import logging as transformers_logging

from pipelines.adapters import is_lycoris_source
from pipelines.text_to_image import TextToImagePipeline
from sdlite.images import grid
from training.families import family_of_folder, family_of_pipeline
from training.schedulers import make_scheduler


def load_pipeline(model: str, model_config: str = "sd15", kind: str = "text") -> TextToImagePipeline:
    """The pipeline of ``kind`` ("text", "image" or "inpaint"; SD or SDXL) of a model folder, or of a
    single-file ``.safetensors`` checkpoint on the architecture ``model_config`` names (a preset or a
    model folder); quiet (no progress bars). A folder loads straight into its kind's pipeline, so that
    an SDXL refiner's folder, which only the image pipelines take, loads for --image."""
    diffusers_logging.disable_progress_bar()  # loading bars: the command prints what it wrote
    transformers_logging.disable_progress_bar()
    path = Path(model)
    if path.is_file() or path.suffix == ".safetensors":  # the loader refuses pickles and says why
        config = model_config if Path(model_config).is_dir() else model_config.lower()
        pipe = TextToImagePipeline.from_single_file(path, config=config)
        if kind != "text":
            pipe = image_pipeline(pipe, inpaint=kind == "inpaint")
    else:  # SD's or SDXL's pipeline: the folder's model family says which
        pipe = family_of_folder(path).pipeline_class(kind).from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_scheduler(pipe: TextToImagePipeline, name: str) -> None:
    """Sample with the scheduler ``name`` (training/schedulers.py), made from the pipeline's own config."""
    scheduler = make_scheduler(name, pipe.scheduler.config)
    if scheduler is not None:
        pipe.scheduler = scheduler


def load_loras(pipe: TextToImagePipeline, loras: list[tuple[str, float]]) -> None:
    """Load each (path, scale) as an adapter of its own and run them all, each at its scale. A LyCORIS
    file (LoHa, LoKr, DoRA) has no adapter to scale: it is merged into the weights at its scale."""
    names, scales = [], []
    for i, (path, scale) in enumerate(loras):
        if Path(path).is_file() and Path(path).suffix != ".safetensors":
            raise ValueError(
                f"--lora {path!r}: LoRA weights are read from .safetensors files only; a pickled file "
                "(.bin, .pt, .ckpt) can run code when loaded, so it is refused"
            )
        if is_lycoris_source(path):
            pipe.load_lycoris(path, strength=scale)
            continue
        name = f"lora{i}"
        names.append(name)
        scales.append(scale)
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
    if names:
        pipe.set_adapters(names, adapter_weights=scales)


def image_arguments(args: argparse.Namespace) -> dict:
    """--image, --mask and --strength as the pipeline's arguments (the pictures read, before any
    model loads), with the size flags each kind takes."""
    if args.image is None:
        return {"height": args.height, "width": args.width}
    if args.mask is None and (args.height is not None or args.width is not None):
        raise ValueError("--height/--width: image to image keeps --image's size; resize the picture instead")
    out = {"image": _picture("--image", args.image)}
    if args.mask is not None:  # inpainting paints at the asked size (the model's by default)
        out |= {"mask_image": _picture("--mask", args.mask), "height": args.height, "width": args.width}
    if args.strength is not None:
        out["strength"] = args.strength
    return out


def image_pipeline(pipe: TextToImagePipeline, inpaint: bool) -> TextToImagePipeline:
    """The same model's image-to-image (or, ``inpaint``, inpainting) pipeline, SD or SDXL."""
    kind = "inpaint" if inpaint else "image"
    pipe = family_of_pipeline(pipe).pipeline_class(kind)(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _picture(flag: str, path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag} {path!r} is not a picture this command can read ({e})") from None


def run(args: argparse.Namespace) -> int:
    extra = image_arguments(args)
    kind = "text" if args.image is None else "image" if args.mask is None else "inpaint"
    pipe = load_pipeline(args.model, args.model_config, kind)
    set_scheduler(pipe, args.scheduler)
    if args.lora:
        default = 1.0 if args.scale is None else args.scale
        load_loras(pipe, [(path, default if scale is None else scale) for path, scale in args.lora])
    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        **extra,
        num_inference_steps=args.num_inference_steps,
        timesteps=args.timesteps,
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
