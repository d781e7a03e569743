"""SDXL training throughput: our train.py's steady-state step on an SDXL model against a reference step
that does what diffusers' ``examples/text_to_image/train_text_to_image_sdxl.py`` does.

The reference (written here from the script's description, not copied) precomputes, before training,
both text encoders' penultimate states and encoder 2's pooled embedding for every caption and one VAE
sample per image (``datasets.map``, as the script does); then per step: the DataLoader reads the
precomputed rows (lists in Arrow, made tensors in the collate) while the dataset transform still decodes,
resizes, flips and crops each image (it gives the original size and crop top-left), noise, timesteps,
diffusers' DDPMScheduler.add_noise, the six time ids built per example from Python lists, U-Net with
added conditioning, MSE, a ``.item()`` of the gathered loss, backward, grad clipping, torch's AdamW, the
LR schedule. Ours runs ``UNetTrainer.optimizer_step`` on a warm cache (benchmarks/bench_train.py's
``run_ours``): cached latent moments and text embeddings, the time ids read with them, fused AdamW.

Both: the tiny-sdxl preset (random weights, seed 0), the same data, batch, resolution and steps, fp32,
no EMA, one process. Each variant runs in a fresh subprocess; rounds alternate the variants. The helpers
(timing, peak memory, the reference loop around the loss, our config, our run, the cache fill) are
bench_train.py's.

    python benchmarks/bench_train_xl.py                  # tiny-sdxl, batch 32, 20 steps, 3 rounds
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run_reference(args) -> dict:
    import datasets
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from PIL import Image

    from sdlite.data.dataset import load_rows
    from sdlite.models_xl import build_components_xl
    from sdlite.presets import get_preset

    accelerator = Accelerator()
    preset = get_preset(args.preset)
    parts = build_components_xl(preset, seed=0)
    noise_scheduler = DDPMScheduler(**preset.config("scheduler"))
    vae, unet = parts.vae, parts.unet
    encoders = [(parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)]
    for model in (vae, parts.text_encoder, parts.text_encoder_2):
        model.requires_grad_(False)
    unet.train()
    size, rng = preset.resolution, np.random.default_rng(0)

    def preprocess(batch):  # per example: decode, resize, random flip, centre crop, normalise; size and crop
        pixels, sizes, crops = [], [], []
        for image in batch["image"]:
            image = image.convert("RGB")
            sizes.append((image.height, image.width))
            scale = size / min(image.size)
            image = image.resize([round(s * scale) for s in image.size], Image.BILINEAR)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            top, left = max(0, round((image.height - size) / 2)), max(0, round((image.width - size) / 2))
            image = image.crop((left, top, left + size, top + size))
            crops.append((top, left))
            array = np.asarray(image, dtype=np.float32) / 255.0
            pixels.append((torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5)
        batch.update(pixel_values=pixels, original_sizes=sizes, crop_top_lefts=crops)
        return batch

    @torch.no_grad()
    def embed(batch):  # both encoders' penultimate states, concatenated; encoder 2's pooled embedding
        states = []
        for tokenizer, encoder in encoders:
            ids = tokenizer(batch["text"], max_length=tokenizer.model_max_length, padding="max_length",
                            truncation=True, return_tensors="pt").input_ids  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(states, dim=-1), "pooled_prompt_embeds": out.text_embeds}

    @torch.no_grad()
    def encode(batch):  # one VAE sample per image, scaled, stored
        pixels = torch.stack(preprocess(dict(batch))["pixel_values"])
        return {"model_input": vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor}

    rows = load_rows(args.data).cast_column("image", datasets.Image())
    with_text = rows.map(embed, batched=True)
    with_latents = rows.map(encode, batched=True, batch_size=args.batch, remove_columns=["image", "text"])
    rows = datasets.concatenate_datasets([with_text, with_latents], axis=1)
    rows.set_transform(preprocess)

    def collate(examples):
        return {
            "model_input": torch.stack([torch.tensor(e["model_input"]) for e in examples]),
            "prompt_embeds": torch.stack([torch.tensor(e["prompt_embeds"]) for e in examples]),
            "pooled_prompt_embeds": torch.stack([torch.tensor(e["pooled_prompt_embeds"]) for e in examples]),
            "original_sizes": [e["original_sizes"] for e in examples],
            "crop_top_lefts": [e["crop_top_lefts"] for e in examples],
        }

    def loss_of(unet, batch):
        latents = batch["model_input"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        )
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        time_ids = torch.cat([
            torch.tensor([list(s + c + (size, size))], device=latents.device, dtype=torch.float32)
            for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])
        ])  # fmt: skip
        added = {"time_ids": time_ids, "text_embeds": batch["pooled_prompt_embeds"]}
        pred = unet(noisy, timesteps, batch["prompt_embeds"], added_cond_kwargs=added).sample
        return F.mse_loss(pred.float(), noise.float(), reduction="mean")

    return bench_train.time_reference(args, accelerator, unet, rows, collate, loss_of)


def main() -> None:
    bench_train.main(preset="tiny-sdxl", reference=run_reference, script=__file__, doc=__doc__)


if __name__ == "__main__":
    main()
