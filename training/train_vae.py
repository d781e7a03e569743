"""Train a preset's autoencoder (``AutoencoderKL``) from scratch on a folder of images.

    accelerate launch training/train_vae.py --config configs/tiny-vae.yaml
    python training/train_vae.py --config configs/tiny-vae.yaml --max_steps 100   # one process

The loss is the VAE objective of Kingma & Welling 2014 with a small weight on the KL term, as latent
diffusion trains its first stage (Rombach et al. 2022, sec. 3 and appendix G, without the perceptual
and adversarial terms): loss = ‖x - D(z)‖² + kl_weight · KL(q(z|x) ‖ N(0, I)), z ~ q(z|x); with
edge_weight > 0 the squared error is weighted, pixel by pixel, by the image's local contrast
(``contrast_weights``), so that corners and edges count more than flat colour.

The learning rate warms up and then decays to zero at the last step: at a constant rate a small VAE
can end on a loss spike. PSNR is measured on held-out images, and the one reported at the end is of
the saved weights, read back from disk.

Output: ``output_dir/vae`` in diffusers' layout (``AutoencoderKL.from_pretrained`` loads it), with
``scaling_factor`` set to 1 / std of the latents of the training images, as Stable Diffusion sets
it, so that scaled latents have unit variance, as the diffusion's prior N(0, I) assumes. The loop
(log, checkpoint, signal and non-finite cadence) is ``training/trainer.py``'s, as the U-Net trainer's;
its machinery is training/accelerator.py, optim.py (optimizer, schedule, EMA) and metrics.py; its data
order is sdlite.data.samplers.StepSampler.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch training/train_vae.py)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if __name__ == "__main__":  # an entry point: third-party noise dropped before diffusers is imported, and
    # the command line read before torch is, so that --help and a wrong flag answer at once
    from training.config.keys import parse_config as _parse_config
    from training.config.vae import VAETrainConfig as _Config
    from training.errors import reported_errors as _reported_errors
    from training.quiet import quiet_third_party

    quiet_third_party()
    with _reported_errors("train_vae.py"):
        COMMAND_LINE = _parse_config(_Config)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

from sdlite.data.dataset import ImageTransform, image_bytes, load_rows  # noqa: E402
from sdlite.data.samplers import StepSampler  # noqa: E402
from sdlite.presets import get_preset  # noqa: E402
from training.accelerator import setup_accelerator  # noqa: E402
from training.config.keys import parse_config  # noqa: E402
from training.config.vae import VAETrainConfig  # noqa: E402
from training.errors import reported_errors  # noqa: E402
from training.launch import follow_launcher  # noqa: E402
from training.optim import make_lr_schedule, make_optimizer  # noqa: E402
from training.trainer import Trainer, leave  # noqa: E402

# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------


def load_images(
    source: str | Path,
    resolution: int,
    image_column: str = "image",
    allow_outside: bool = False,
    max_pixels: int | None = None,
) -> torch.Tensor:
    """(N, 3, R, R) in [-1, 1]: every image of a data source, resized and centre-cropped. The
    images are small, so they are held in memory whole."""
    # The VAE needs no captions. Image paths of a table must lie in its folder unless allow_outside.
    rows = load_rows(source, image_column, caption_column=image_column, allow_outside=allow_outside)
    transform = ImageTransform(resolution, max_pixels=max_pixels)
    return torch.stack([transform(image_bytes(row[image_column]), i) for i, row in enumerate(rows)])


def load_splits(cfg: VAETrainConfig, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) images."""
    options = dict(allow_outside=cfg.data.allow_outside_paths, max_pixels=cfg.data.max_image_pixels)
    images = load_images(cfg.data.train_data_dir, resolution, cfg.data.image_column, **options)
    if cfg.data.eval_data_dir:
        return images, load_images(cfg.data.eval_data_dir, resolution, cfg.data.image_column, **options)
    if len(images) <= cfg.data.eval_count:
        raise ValueError(
            f"{cfg.data.train_data_dir} has {len(images)} images, too few to hold out eval_count="
            f"{cfg.data.eval_count}; lower eval_count or pass eval_data_dir"
        )
    return images[cfg.data.eval_count :], images[: cfg.data.eval_count]


# ---------------------------------------------------------------------------------------------------
# The objective and the measurements
# ---------------------------------------------------------------------------------------------------


def contrast_weights(x: torch.Tensor, edge_weight: float) -> torch.Tensor:
    """(N, 1, H, W) pixel weights 1 + edge_weight · c(x): c is the largest over the channels of
    |x - box₃(x)|, the pixel's distance from the mean of its 3x3 neighbourhood, the image padded with
    the median of its border (its background, as ``sdlite.shape_reading`` takes it).

    Not from a paper: c is 0 on flat colour and grows with the share of the neighbourhood that differs,
    so a shape's convex corner pixel (5 of 9 neighbours background) weighs more than a straight edge's
    (3 of 9); those are the pixels a VAE trained on the plain mean gives back last (benchmarks/RESULTS.md,
    "The VAE's round trip, read strictly"). The largest channel, not their mean, so that a colour near
    the background in two channels (yellow on white) weighs as much as one far in all three; the
    background outside, not the border repeated, so that a corner on the image's edge is a corner."""
    x = x.float()
    n, c, h, w = x.shape
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
    padded = border.median(dim=-1).values[..., None, None].expand(n, c, h + 2, w + 2).clone()
    padded[..., 1:-1, 1:-1] = x
    local = F.avg_pool2d(padded, 3, stride=1)
    return 1 + edge_weight * (x - local).abs().amax(dim=1, keepdim=True)


class VAEObjective(torch.nn.Module):
    """loss(x) = reconstruction of z ~ q(z|x) + kl_weight · KL(q(z|x) ‖ N(0, I)), both per element;
    with edge_weight > 0 the reconstruction is the mean weighted by ``contrast_weights(x)``.

    A module, so that accelerate wraps the whole objective: under DDP gradients are only reduced
    for what runs through the wrapped module's forward, and the VAE's own forward hides q(z|x)."""

    def __init__(
        self,
        vae: AutoencoderKL,
        reconstruction_loss: str = "mse",
        kl_weight: float = 1e-6,
        edge_weight: float = 0.0,
    ):
        super().__init__()
        if reconstruction_loss not in ("mse", "l1"):
            raise ValueError(f"reconstruction_loss={reconstruction_loss!r}; expected 'mse' or 'l1'")
        if not edge_weight >= 0:
            raise ValueError(f"edge_weight={edge_weight!r}; expected a number >= 0 (0: the plain mean)")
        self.vae, self.reconstruction_loss, self.kl_weight = vae, reconstruction_loss, kl_weight
        self.edge_weight = edge_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample.float()
        distance = F.mse_loss if self.reconstruction_loss == "mse" else F.l1_loss
        if self.edge_weight > 0:
            weights = contrast_weights(x, self.edge_weight)
            rec = (weights * distance(reconstruction, x.float(), reduction="none")).mean() / weights.mean()
        else:
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
    preset = cfg.model.shaped_preset(get_preset(cfg.model.preset))
    config = preset.config("vae")
    resolution = cfg.data.resolution or preset.resolution
    config["sample_size"] = resolution
    return AutoencoderKL(**config), resolution


def save_vae(vae: AutoencoderKL, train_images: torch.Tensor, cfg: VAETrainConfig, path: Path) -> float:
    """Write the VAE to ``path`` with scaling_factor = 1 / std of the training images' latents; returns
    that std."""
    std = latent_std(vae, train_images[: cfg.run.scale_count], seed=cfg.optimizer.seed)
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path, safe_serialization=True)
    return std


class VAETrainer(Trainer):
    """A VAE training run: ``VAETrainer(cfg).train()`` builds, resumes, trains, saves output_dir/vae."""

    project = "sdlite-train-vae"

    cfg: VAETrainConfig

    def make_accelerator(self):
        self.started = time.perf_counter()
        return setup_accelerator(
            self.cfg.run.output_dir, self.cfg.optimizer.mixed_precision, report_to=self.cfg.run.report_to
        )

    def final_path(self) -> Path:
        return Path(self.cfg.run.output_dir) / "vae"

    def setup(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        torch.manual_seed(cfg.optimizer.seed)  # the initial weights; the steps' draws continue this stream
        self.vae, resolution = build_vae(cfg)
        self.train_images, self.eval_images = load_splits(cfg, resolution)
        opt = cfg.optimizer
        objective = VAEObjective(self.vae, opt.reconstruction_loss, opt.kl_weight, opt.edge_weight)
        self.params = list(objective.parameters())
        groups = [{"params": self.params, "name": "vae"}]  # logged as lr/vae
        optimizer = make_optimizer(
            groups, cfg.optimizer.learning_rate, weight_decay=cfg.optimizer.adam_weight_decay
        )
        self.lr_schedule = make_lr_schedule(
            optimizer, cfg.optimizer.lr_scheduler, cfg.optimizer.lr_warmup_steps, cfg.optimizer.max_steps
        )
        self.objective, self.optimizer = acc.prepare(objective, optimizer)

        self.start_step = self.resume()
        sampler = StepSampler(len(self.train_images), opt.train_batch_size, opt.seed, opt.max_steps,
                              self.start_step, acc.num_processes, acc.process_index)  # fmt: skip
        self.batches, self.global_batch, self.eval_every = (
            iter(sampler),
            sampler.global_batch,
            cfg.run.eval_every,
        )
        self.start_logs()
        acc.print(
            f"VAE {cfg.model.preset}: {sum(p.numel() for p in self.params) / 1e6:.2f} M parameters, "
            f"{len(self.train_images)} training and {len(self.eval_images)} held-out images at {resolution} "
            f"px, steps {self.start_step} -> {cfg.optimizer.max_steps}"
        )

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.vae}

    def train(self) -> dict:
        """Train to max_steps, save, then measure the saved weights; returns the final figures."""
        try:
            self.objective.train()
            self.loop()
            self.accelerator.wait_for_everyone()
            result = self.save_final() if self.accelerator.is_main_process else {}
            self.accelerator.end_training()
            return result
        finally:
            self.release()

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        acc = self.accelerator
        x = self.train_images[[index for index, _ in next(self.batches)]].to(acc.device)
        with acc.autocast():
            loss, rec, kl = self.objective(x)
        acc.backward(loss)
        nonfinite = self.update(~torch.isfinite(loss.detach()))
        return {"loss": loss, "rec": rec, "kl": kl}, nonfinite

    def progress(self, logs: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{logs['loss']:.4f}", "kl": f"{logs['kl']:.2f}"}

    def evaluate(self, step: int) -> None:
        """Held-out PSNR, logged."""
        acc = self.accelerator
        if acc.is_main_process:
            self.vae.eval()
            held_out = psnr(self.vae, self.eval_images.to(acc.device))
            acc.log({"val/psnr": held_out}, step=step)
            acc.print(f"step {step}: held-out PSNR {held_out:.2f} dB")
            self.vae.train()

    def save_final(self) -> dict:
        """Write output_dir/vae (main process; published atomically, as the U-Net's final_dir), read it
        back and measure it: the final figures."""
        acc, cfg = self.accelerator, self.cfg
        self.vae.eval()
        with self.publishing() as staging:
            std = save_vae(self.vae, self.train_images.to(acc.device), cfg, staging)
        path = self.final
        saved = AutoencoderKL.from_pretrained(path).to(acc.device)  # what was written, not what is in memory
        result = {
            "path": str(path),
            "psnr": psnr(saved, self.eval_images.to(acc.device)),
            "latent_std": std,
            "scaling_factor": saved.config.scaling_factor,
            "seconds": time.perf_counter() - self.started,
        }
        acc.log({"val/psnr": result["psnr"]}, step=cfg.optimizer.max_steps)
        acc.print(
            f"saved {path}: held-out PSNR {result['psnr']:.2f} dB, latent std {std:.3f} -> "
            f"scaling_factor {result['scaling_factor']:.4f} ({result['seconds']:.0f} s)"
        )
        (Path(cfg.run.output_dir) / "vae_results.json").write_text(json.dumps(result, indent=2) + "\n")
        return result


def train(cfg: VAETrainConfig) -> dict:
    """Train (or resume), save, then measure the saved weights; returns the final figures."""
    return VAETrainer(cfg).train()


def main(argv: list[str] | None = None) -> dict:
    """Parse the flags and train. Errors propagate to the caller; run as a script, training/errors.py
    ends those sdlite raises on purpose with one line (``--debug``: the traceback)."""
    return train(parse_config(VAETrainConfig, argv))


if __name__ == "__main__":
    follow_launcher()  # one-process accelerate launch: if the launcher dies, checkpoint and stop
    with reported_errors("train_vae.py"):  # one line for an error of ours; --debug: the traceback
        trainer = VAETrainer(COMMAND_LINE)
        trainer.train()
    leave()  # the trainer still held: its DDP model is never freed (see trainer.leave)
