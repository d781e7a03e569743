"""Training throughput: our train.py's steady-state step against a diffusers-script-style reference step.

The reference does per step what diffusers' ``examples/text_to_image/train_text_to_image.py`` does
(written here from its description, not copied): decode and transform the batch's images, VAE encode
and sample, CLIP text encode, noise, diffusers' DDPMScheduler.add_noise, U-Net, MSE, backward, grad
clipping, torch's default AdamW, LR schedule prepared by accelerate, a ``.item()`` of the gathered
loss every step. Ours runs ``training.unet_step.optimizer_step`` after ``training.train.setup`` on a
warm cache: U-Net forward/backward and fused AdamW on cached latents and embeddings.

Both: the same preset (random weights, seed 0), data, batch size, resolution and steps, fp32, no EMA
(the script's default), one process. Each variant runs in a fresh subprocess, so its peak memory
(RSS on CPU, torch.cuda.max_memory_allocated on GPU) is its own; rounds alternate the variants.

    python benchmarks/bench_train.py                        # tiny, batch 32, 20 steps, 3 rounds
    python benchmarks/bench_train.py --preset small --batch 8 --steps 10 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_memory_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed_steps(step, args, device) -> float:
    """Seconds for args.steps steps after args.warmup unmeasured ones."""
    import torch

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_reference(args) -> dict:
    import datasets
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from PIL import Image

    from sdlite.data.dataset import load_rows
    from sdlite.models import build_components
    from sdlite.presets import get_preset

    accelerator = Accelerator()
    preset = get_preset(args.preset)
    parts = build_components(preset, seed=0)
    noise_scheduler = DDPMScheduler(**preset.config("scheduler"))
    vae, text_encoder, unet, tokenizer = parts.vae, parts.text_encoder, parts.unet, parts.tokenizer
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.train()
    size, rng = preset.resolution, np.random.default_rng(0)

    def preprocess(batch):  # per example, every step: decode, resize, centre crop, random flip, normalise
        pixels = []
        for image in batch["image"]:
            image = image.convert("RGB")
            scale = size / min(image.size)
            image = image.resize([round(s * scale) for s in image.size], Image.BILINEAR)
            left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
            image = image.crop((left, top, left + size, top + size))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            array = np.asarray(image, dtype=np.float32) / 255.0
            pixels.append((torch.from_numpy(array).permute(2, 0, 1) - 0.5) / 0.5)
        ids = tokenizer(
            batch["text"],
            max_length=tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return {"pixel_values": pixels, "input_ids": list(ids)}

    rows = load_rows(args.data).cast_column("image", datasets.Image())
    rows.set_transform(preprocess)

    def collate(examples):
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float(),
            "input_ids": torch.stack([e["input_ids"] for e in examples]),
        }

    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)

    def loss_of(unet, batch):
        latents = vae.encode(batch["pixel_values"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = text_encoder(batch["input_ids"], return_dict=False)[0]
        model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        return F.mse_loss(model_pred.float(), noise.float(), reduction="mean")

    return time_reference(args, accelerator, unet, rows, collate, loss_of)


def time_reference(args, accelerator, unet, rows, collate, loss_of) -> dict:
    """The diffusers scripts' loop around ``loss_of(unet, batch)``, timed: a shuffled DataLoader cycled
    for ever, torch's AdamW and a constant LR schedule prepared by accelerate; per step the loss's
    gathered ``.item()`` (the scripts log it every step), backward, clipping to 1, optimizer and schedule
    steps. Both reference benchmarks (SD here, SDXL in bench_train_xl.py) run it."""
    import torch
    from diffusers.optimization import get_scheduler

    loader = torch.utils.data.DataLoader(
        rows, shuffle=True, batch_size=args.batch, collate_fn=collate, drop_last=True
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer, num_warmup_steps=0, num_training_steps=10_000)
    unet, optimizer, loader, lr_scheduler = accelerator.prepare(unet, optimizer, loader, lr_scheduler)
    batches = iter(loader)

    def step(_):
        nonlocal batches
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        with accelerator.accumulate(unet):
            loss = loss_of(unet, batch)
            accelerator.gather(loss.repeat(args.batch)).mean().item()  # the script logs it every step
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

    return {"seconds": timed_steps(step, args, accelerator.device), "device": accelerator.device}


def ours_config(args, max_steps: int):
    from training.config import parse_config
    from training.config.unet import TrainConfig

    flags = dict(
        preset=args.preset,
        train_data_dir=args.data,
        cache_dir=args.cache,
        output_dir=args.out,
        train_batch_size=args.batch,
        max_steps=max_steps,
        ema_decay="none",
        report_to="none",
        checkpoint_every=0,
        log_every=10**9,
        seed=0,
        random_flip="true",  # as the reference: both flips are cached, the flip is picked per step
    )
    return parse_config(TrainConfig, [t for k, v in flags.items() for t in (f"--{k}", str(v))])


def run_ours(args) -> dict:
    from training.train import UNetTrainer

    trainer = UNetTrainer(ours_config(args, args.warmup + args.steps))
    return {
        "seconds": timed_steps(trainer.optimizer_step, args, trainer.accelerator.device),
        "device": trainer.accelerator.device,
    }


def warm_cache(args) -> dict:
    """Fill the cache (what a first run pays once), timed."""
    from training.accelerator import setup_accelerator
    from training.examples import training_data
    from training.families import family_of

    cfg = ours_config(args, 1)
    accelerator = setup_accelerator(args.out, report_to=None)
    start = time.perf_counter()
    training_data(
        cfg, accelerator, family_of(cfg.model).load(cfg.model, cfg.optimizer.seed, accelerator.device)
    )
    return {"seconds": time.perf_counter() - start, "device": accelerator.device}


def child(args, reference=None) -> None:
    """One variant, in this subprocess: ``reference`` is the reference step's runner (this file's by
    default; bench_train_xl.py passes SDXL's)."""
    import torch

    torch.set_num_threads(args.threads)
    runners = {"reference": reference or run_reference, "ours": run_ours, "warm": warm_cache}
    result = runners[args.child](args)
    result["peak_mb"] = peak_memory_mb(result.pop("device"))
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args, variant: str, script: str = __file__) -> dict:
    command = [sys.executable, script, "--child", variant, *sys.argv[1:]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    out = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def measure(args, script: str = __file__) -> dict[str, list[dict]]:
    """The cache fill once, then rounds of both variants in alternating order."""
    warm = spawn(args, "warm", script)
    print(f"cache fill (once, {args.images} images + captions): {warm['seconds']:.1f} s")
    results = {"reference": [], "ours": []}
    for r in range(args.rounds):
        order = ["reference", "ours"] if r % 2 == 0 else ["ours", "reference"]
        for variant in order:
            result = spawn(args, variant, script)
            result["images_per_s"] = args.batch * args.steps / result["seconds"]
            results[variant].append(result)
            speed, peak_mb = result["images_per_s"], result["peak_mb"]
            print(f"round {r}: {variant:<9} {speed:8.1f} images/s, peak {peak_mb:.0f} MB", flush=True)
    return results


def main(preset: str = "tiny", reference=None, script: str = __file__, doc: str = __doc__) -> None:
    """Parse the flags; in a child run one variant, else the whole comparison (the SDXL benchmark calls
    this with its preset, its reference step and its own file)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--preset", default=preset)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args, reference)

    import diffusers
    import torch

    from sdlite.data.shapes import write_dataset
    from sdlite.presets import get_preset

    work = Path(tempfile.mkdtemp(prefix=Path(script).stem + "_"))
    write_dataset(work / "data", count=args.images, seed=0, image_size=get_preset(args.preset).resolution)
    sys.argv += ["--data", str(work / "data"), "--cache", str(work / "cache"), "--out", str(work / "run")]
    print(
        f"torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, {args.threads} thread(s); preset {args.preset}, batch {args.batch}, "
        f"{args.steps} steps after {args.warmup} warm-up, {args.rounds} rounds"
    )
    try:
        results = measure(args, script)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median = {v: statistics.median(x["images_per_s"] for x in rs) for v, rs in results.items()}
    peak = {v: max(x["peak_mb"] for x in rs) for v, rs in results.items()}
    print("\n| variant | images/s (median) | peak memory MB |\n|---|---|---|")
    for v in results:
        print(f"| {v} | {median[v]:.1f} | {peak[v]:.0f} |")
    print(
        f"\nthroughput ratio ours / reference: {median['ours'] / median['reference']:.2f}x; "
        f"peak memory ratio: {peak['ours'] / peak['reference']:.2f}"
    )


if __name__ == "__main__":
    main()
