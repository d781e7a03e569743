"""Train a preset's autoencoder (``AutoencoderKL``) from scratch on a folder of images.

    accelerate launch training/train_vae.py --config configs/tiny-vae.yaml
    python training/train_vae.py --config configs/tiny-vae.yaml --max_steps 100   # one process

The loss is the VAE objective of Kingma & Welling 2014 with a small weight on the KL term, as latent
diffusion trains its first stage (Rombach et al. 2022, sec. 3 and appendix G, without the perceptual
and adversarial terms): loss = ‖x - D(z)‖² + kl_weight · KL(q(z|x) ‖ N(0, I)), z ~ q(z|x).

The learning rate warms up and then decays to zero at the last step: at a constant rate a small VAE
can end on a loss spike (see shared/DESIGN.md). PSNR is measured on held-out images, and the one
reported at the end is of the saved weights, read back from disk.

Output: ``output_dir/vae`` in diffusers' layout (``AutoencoderKL.from_pretrained`` loads it), with
``scaling_factor`` set to 1 / std of the latents of the training images, as Stable Diffusion sets
it, so that scaled latents have unit variance, as the diffusion's prior N(0, I) assumes. The loop's
machinery (accelerator, data order, optimizer, schedule, checkpoints, metrics) is ``training/loop.py``.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

if __package__ in (None, ""):  # run as a script (accelerate launch training/train_vae.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdlite.data.dataset import ImageTransform, image_bytes, load_rows  # noqa: E402
from sdlite.presets import get_preset  # noqa: E402
from sdlite.training.checkpoint import StopSignals, find_resume, load_checkpoint, save_checkpoint  # noqa: E402
from sdlite.training.config import parse_config, save_yaml  # noqa: E402
from sdlite.training.loop import (  # noqa: E402
    Metrics,
    StepSampler,
    make_lr_schedule,
    make_optimizer,
    progress_bar,
    setup_accelerator,
)


@dataclass
class VAETrainConfig:
    """Train the preset's AutoencoderKL from scratch on an image folder."""

    # Data: the sources train.py reads (an image folder, a save_to_disk folder, a CSV/parquet/JSON file).
    train_data_dir: str = "data/shapes/train"
    eval_data_dir: str | None = None  # held-out images for PSNR; None: hold out eval_count of train
    eval_count: int = 256  # images held out of train_data_dir when eval_data_dir is None
    image_column: str = "image"
    preset: str = "tiny"  # the VAE config to build (sdlite.presets)
    resolution: int | None = None  # image side; None: the preset's
    # Optimisation
    seed: int = 0
    max_steps: int = 600
    train_batch_size: int = 32
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"  # a diffusers.optimization schedule; cosine decays to 0 at max_steps
    lr_warmup_steps: int = 50
    adam_weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0: no clipping
    reconstruction_loss: str = "mse"  # "mse" or "l1"
    kl_weight: float = 1e-6
    mixed_precision: str | None = None  # "no", "fp16", "bf16"; None: accelerate's config decides
    # Output, logging, checkpoints
    output_dir: str = "runs/tiny-vae"
    scale_count: int = 1024  # training images encoded to measure the latents' std
    log_every: int = 100
    eval_every: int = 0  # steps between held-out PSNR reports; 0: only at the end
    report_to: str | None = "tensorboard"
    checkpoint_every: int = 0  # steps; 0: none
    checkpoints_total_limit: int | None = 2
    resume: str | None = None  # "latest" or a checkpoint folder


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def load_images(source: str | Path, resolution: int, image_column: str = "image") -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: every image of a data source, resized and centre-cropped. The
    images are small, so they are held in memory whole."""
    rows = load_rows(source, image_column, caption_column=image_column)  # the VAE needs no captions
    transform = ImageTransform(resolution)
    return torch.stack([transform(image_bytes(row[image_column]), i) for i, row in enumerate(rows)])


def load_splits(cfg: VAETrainConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images."""
    images = load_images(cfg.train_data_dir, resolution, cfg.image_column)
    if cfg.eval_data_dir:
        return images, load_images(cfg.eval_data_dir, resolution, cfg.image_column)
    if len(images) <= cfg.eval_count:
        raise ValueError(
            f"{cfg.train_data_dir} has {len(images)} images, too few to hold out eval_count="
            f"{cfg.eval_count}; lower eval_count or pass eval_data_dir"
        )
    return images[cfg.eval_count :], images[: cfg.eval_count]


# ---------------------------------------------------------------------------------------------------
# The objective and the measurements
# ---------------------------------------------------------------------------------------------------


class VAEObjective(torch.nn.Module):
    """loss(x) = reconstruction of z ~ q(z|x) + kl_weight · KL(q(z|x) ‖ N(0, I)), both per element.

    A module, so that accelerate wraps the whole objective: under DDP gradients are only reduced
    for what runs through the wrapped module's forward, and the VAE's own forward hides q(z|x)."""

    def __init__(self, vae: AutoencoderKL, reconstruction_loss: str = "mse", kl_weight: float = 1e-6):
        super().__init__()
        if reconstruction_loss not in ("mse", "l1"):
            raise ValueError(f"reconstruction_loss={reconstruction_loss!r}; expected 'mse' or 'l1'")
        self.vae, self.reconstruction_loss, self.kl_weight = vae, reconstruction_loss, kl_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample.float()
        distance = F.mse_loss if self.reconstruction_loss == "mse" else F.l1_loss
        rec = distance(reconstruction, x.float())
        kl = posterior.kl().mean() / posterior.mean[0].numel()  # diffusers sums KL over a latent
        return rec + self.kl_weight * kl, rec.detach(), kl.detach()


@torch.no_grad()
def psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128) -> float:
    """PSNR in dB of the reconstructions D(mean of q(z|x)), pixels in [0, 1]."""
    squared_error = 0.0
    for batch in images.split(batch_size):
        x = batch.to(vae.device, vae.dtype)
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        squared_error += (((reconstruction.float() - x.float()) / 2) ** 2).sum().item()
    return 10 * math.log10(1 / max(squared_error / images.numel(), 1e-12))


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 128, seed: int = 0) -> float:
    """Standard deviation of z ~ q(z|x) over images. scaling_factor = 1 / this: Rombach et al. 2022
    (sec. 4.3.2) scale latents to unit variance, and SD 1.x's 0.18215 was measured this way."""
    generator = torch.Generator(device=vae.device).manual_seed(seed)
    latents = [
        vae.encode(b.to(vae.device, vae.dtype)).latent_dist.sample(generator).float()
        for b in images.split(batch_size)
    ]
    return torch.cat(latents).std().item()


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


def build_vae(cfg: VAETrainConfig) -> tuple[AutoencoderKL, int]:
    """The preset's VAE with random weights, and the image side it is trained at."""
    preset = get_preset(cfg.preset)
    config = preset.config("vae")
    resolution = cfg.resolution or preset.resolution
    config["sample_size"] = resolution
    return AutoencoderKL(**config), resolution


def save_vae(vae: AutoencoderKL, train_images: torch.Tensor, cfg: VAETrainConfig) -> tuple[Path, float]:
    """Write output_dir/vae with scaling_factor = 1 / std of the training images' latents."""
    std = latent_std(vae, train_images[: cfg.scale_count], seed=cfg.seed)
    vae.register_to_config(scaling_factor=1.0 / std)
    path = Path(cfg.output_dir) / "vae"
    vae.save_pretrained(path, safe_serialization=True)
    return path, std


def train(cfg: VAETrainConfig) -> dict:
    """Train (or resume), save, then measure the saved weights; returns the final figures."""
    start = time.perf_counter()
    acc = setup_accelerator(cfg.output_dir, cfg.mixed_precision, report_to=cfg.report_to)
    torch.manual_seed(cfg.seed)  # the initial weights; the steps' draws continue this stream
    vae, resolution = build_vae(cfg)
    train_images, eval_images = load_splits(cfg, resolution)
    objective = VAEObjective(vae, cfg.reconstruction_loss, cfg.kl_weight)
    optimizer = make_optimizer(objective.parameters(), cfg.learning_rate, weight_decay=cfg.adam_weight_decay)
    lr_schedule = make_lr_schedule(optimizer, cfg.lr_scheduler, cfg.lr_warmup_steps, cfg.max_steps)
    objective, optimizer = acc.prepare(objective, optimizer)

    start_step, checkpoint = 0, find_resume(cfg.output_dir, cfg.resume)
    if checkpoint is not None:
        start_step = load_checkpoint(acc, checkpoint, {"vae": vae}, optimizer, lr_schedule)["step"]
        acc.print(f"resumed from {checkpoint} at step {start_step}")
    sampler = StepSampler(
        len(train_images),
        cfg.train_batch_size,
        cfg.seed,
        cfg.max_steps,
        start_step,
        acc.num_processes,
        acc.process_index,
    )
    if acc.is_main_process:
        Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, Path(cfg.output_dir) / "config.yaml")
        acc.init_trackers("sdlite-train-vae")
    acc.print(
        f"VAE {cfg.preset}: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters, "
        f"{len(train_images)} training and {len(eval_images)} held-out images at {resolution} px, "
        f"steps {start_step} -> {cfg.max_steps}"
    )

    metrics = Metrics(acc, images_per_step=sampler.global_batch)
    bar = progress_bar(acc, cfg.max_steps, start_step)
    objective.train()
    modules = {"vae": vae}
    with StopSignals() as stop:  # SIGTERM / Ctrl-C: a checkpoint after the step, then exit 128 + signal
        for step, items in enumerate(sampler, start=start_step):
            x = train_images[[index for index, _ in items]].to(acc.device)
            with acc.autocast():
                loss, rec, kl = objective(x)
            acc.backward(loss)
            if cfg.max_grad_norm > 0:
                acc.clip_grad_norm_(objective.parameters(), cfg.max_grad_norm)
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            metrics.add(loss=loss, rec=rec, kl=kl)
            done = step + 1
            bar.update(1)
            logging = done % cfg.log_every == 0 or done == cfg.max_steps
            saving = bool(cfg.checkpoint_every) and done % cfg.checkpoint_every == 0
            if logging:
                logs = metrics.report(done, lr=lr_schedule.get_last_lr()[0])
                bar.set_postfix(loss=f"{logs['loss']:.4f}", kl=f"{logs['kl']:.2f}")
            if saving:
                save_checkpoint(acc, cfg.output_dir, done, modules, optimizer, lr_schedule,
                                keep=cfg.checkpoints_total_limit)  # fmt: skip
            signum = stop.requested(acc, synced=logging or saving)
            if signum:
                if not saving:
                    save_checkpoint(acc, cfg.output_dir, done, modules, optimizer, lr_schedule,
                                    keep=cfg.checkpoints_total_limit)  # fmt: skip
                bar.close()
                acc.print(f"{signal.Signals(signum).name}: stopped after step {done} with checkpoint-{done} "
                          "in output_dir; continue with --resume latest")  # fmt: skip
                acc.end_training()
                raise SystemExit(128 + signum)
            if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps and acc.is_main_process:
                vae.eval()
                held_out = psnr(vae, eval_images.to(acc.device))
                acc.log({"val/psnr": held_out}, step=done)
                acc.print(f"step {done}: held-out PSNR {held_out:.2f} dB")
                vae.train()
    bar.close()

    acc.wait_for_everyone()
    result = {}
    if acc.is_main_process:
        vae.eval()
        path, std = save_vae(vae, train_images.to(acc.device), cfg)
        saved = AutoencoderKL.from_pretrained(path).to(acc.device)  # what was written, not what is in memory
        result = {
            "path": str(path),
            "psnr": psnr(saved, eval_images.to(acc.device)),
            "latent_std": std,
            "scaling_factor": saved.config.scaling_factor,
            "seconds": time.perf_counter() - start,
        }
        acc.log({"val/psnr": result["psnr"]}, step=cfg.max_steps)
        acc.print(
            f"saved {path}: held-out PSNR {result['psnr']:.2f} dB, latent std {std:.3f} -> "
            f"scaling_factor {result['scaling_factor']:.4f} ({result['seconds']:.0f} s)"
        )
        (Path(cfg.output_dir) / "vae_results.json").write_text(json.dumps(result, indent=2) + "\n")
    acc.end_training()
    return result


def main(argv: list[str] | None = None) -> dict:
    return train(parse_config(VAETrainConfig, argv))


if __name__ == "__main__":
    main()
