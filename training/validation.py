"""What a U-Net run shows of itself at each validation: the held-out loss at fixed timesteps, one image
per sample prompt, and the image-to-image sample of ``validation_image``.

``UNetValidation.evaluate``, the trainer's (training/train.py's ``UNetTrainer`` inherits it), calls the
functions with the EMA weights swapped in and writes what they return; they hold no state, so the same
draws come back at every validation.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from training.config.validation import ValidationSection
from training.metrics import log_image
from training.sample_prompts import SamplePrompt, run_prompts, sample_batches, save_samples
from training.schedulers import make_scheduler
from training.sharding import reshard
from training.unet_step import diffusion_loss, latents_of


def held_out_loss(denoiser, val: dict, parts, text_condition, batch_size: int, device,
                  extra=None) -> dict[str, float]:  # fmt: skip
    """The unweighted loss on held-out data at fixed timesteps, with noise fixed for the whole run
    (``val``: the batch, its timesteps and noises); ``text_condition(batch, drop)``: the trainer's;
    ``extra``: an inpainting U-Net's channels beside x_t for the batch (training/inpaint_step.py)."""
    logs = {}
    for k, t in enumerate(val["timesteps"]):
        total = 0.0
        for rows in torch.arange(len(val["noise"][k])).split(batch_size):
            batch = {name: value[rows] for name, value in val["batch"].items()}
            x0 = latents_of(batch, parts.vae, val["latent_noise"][rows])
            text = text_condition(
                batch, torch.zeros(len(rows), dtype=torch.bool, device=device)
            )  # no dropout
            ts = torch.full((len(rows),), t)
            more = None if extra is None else extra[rows]
            loss = diffusion_loss(denoiser, parts.scheduler, x0, text, ts, val["noise"][k][rows], extra=more)
            total += loss.item() * len(rows)
        logs[f"val/loss_t{t}"] = total / len(val["noise"][k])
    logs["val/loss"] = sum(logs.values()) / len(logs)
    return logs


def sample_images(pipe, prompts: list[SamplePrompt], section: ValidationSection, seed: int, device) -> list:
    """One image per sample prompt by ``pipe``: prompt i from seed + i unless its line sets --d, at
    validation_inference_steps and validation_guidance unless it sets --s and --l. An inpainting
    pipeline paints the whole image (a full mask: what the model was trained on as text to image)."""
    steps, guidance = section.validation_inference_steps, section.validation_guidance
    images = [None] * len(prompts)
    for places, call in sample_batches(prompts, seed, steps, guidance):
        generators = [torch.Generator(device).manual_seed(s) for s in call.pop("seeds")]
        if hasattr(pipe, "mask_processor"):
            call |= full_mask(pipe, call, len(places))
        for i, image in zip(places, pipe(**call, generator=generators, output_type="pil").images):
            images[i] = image
    return images


def full_mask(pipe, call: dict, n: int) -> dict:
    """An inpainting call's image and mask_image for text to image: a white mask over the whole image,
    so that the masked image is all zeros whatever the image holds."""
    from PIL import Image

    width, height = pipe.resolve_size(call.get("height"), call.get("width"))[::-1]
    white = Image.new("RGB", (width, height), (255, 255, 255))
    return {"image": [white] * n, "mask_image": [white] * n}


def image_to_image_sample(pipe, prompt: SamplePrompt, section: ValidationSection, seed: int, device):
    """validation_image, at the model's size, redrawn toward ``prompt`` (with its line's options, as in
    sample_images) at validation_strength by the image-to-image pipeline ``pipe``."""
    from PIL import Image

    [(_, call)] = sample_batches(
        [prompt], seed, section.validation_inference_steps, section.validation_guidance
    )
    height, width = pipe.resolve_size(call.pop("height"), call.pop("width"))
    with Image.open(section.validation_image) as image:
        image = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    generator = torch.Generator(device).manual_seed(call.pop("seeds")[0])
    out = pipe(
        **call, image=image, strength=section.validation_strength, generator=generator, output_type="pil"
    )
    return out.images[0]


class UNetValidation:
    """The U-Net trainer's validation (training/trainer.py's loop calls ``evaluate`` every eval_every
    steps): what it reads of the trainer (cfg, accelerator, model, val, parts, family, inpainter,
    distiller, sharding, data, ``ema_weights``, ``text_condition``) is set up by training/train.py."""

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out loss and the sample prompts' images (validation/step-N/NN.png and their grid
        validation/step-N.png, in TensorBoard too; with validation_image, its image-to-image sample
        validation/step-N-image.png), with the EMA weights when there are any."""
        acc, cfg = self.accelerator, self.cfg
        # Sharded, every process runs the same forwards (each gathers the blocks it runs); else the main one.
        if not (acc.is_main_process or self.sharding) or (self.val is None and not self.sample_prompts):
            return {}
        denoiser = acc.unwrap_model(self.model).eval()  # unwrapped: no DDP collectives on one process
        logs = {}
        with self.ema_weights(), acc.autocast():
            if self.val is not None:
                logs = self.held_out_loss(denoiser)
            if self.sample_prompts:
                images = self.sample_images()
            if self.sample_prompts and acc.is_main_process:
                log_image(
                    acc,
                    "validation",
                    save_samples(images, Path(cfg.run.output_dir) / "validation", step),
                    step,
                )
                for i, image in enumerate(images):
                    log_image(acc, f"validation/{i:02d}", image, step)
            if cfg.validation.validation_image is not None:
                image = self.image_to_image_sample()
                if acc.is_main_process:
                    image.save(Path(cfg.run.output_dir) / "validation" / f"step-{step}-image.png")
                    log_image(acc, "validation/image", image, step)
        if self.sharding:
            reshard(denoiser)  # the gathered weights the forwards left
        denoiser.train()
        if logs:
            acc.log(logs, step=step)
            acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
        return logs

    def held_out_loss(self, denoiser) -> dict[str, float]:
        batch_size, device = self.cfg.optimizer.train_batch_size, self.accelerator.device
        extra = None
        if self.inpainter is not None:
            extra = self.inpainter.held_out(self.val["batch"], self.data.latent_shape, device)
        return held_out_loss(denoiser, self.val, self.parts, self.text_condition, batch_size, device, extra)

    @functools.cached_property
    def sample_prompts(self) -> list[SamplePrompt]:
        """validation_prompts, then validation_prompts_file's (checked at start-up by cfg.check)."""
        return run_prompts(
            self.cfg.validation.validation_prompts, self.cfg.validation.validation_prompts_file
        )

    def sample_images(self) -> list:
        pipe = self.family.pipeline("text" if self.inpainter is None else "inpaint")  # inpaint: a full mask
        if self.distiller is not None:  # a consistency model samples with its own few-step sampler
            pipe.scheduler = make_scheduler("lcm", pipe.scheduler.config)
        seed, device = self.cfg.optimizer.seed, self.accelerator.device
        return sample_images(pipe, self.sample_prompts, self.cfg.validation, seed, device)

    def image_to_image_sample(self):
        pipe = self.family.pipeline("image")
        seed, device = self.cfg.optimizer.seed, self.accelerator.device
        return image_to_image_sample(pipe, self.sample_prompts[0], self.cfg.validation, seed, device)
