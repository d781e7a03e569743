"""The math of the U-Net trainer's step (Ho et al. 2020, Algorithm 1, on latents): the model ε_θ, the
step's random draws, x_0 of a batch and the loss; c of a batch is the model family's (training/family.py).
``UNetTrainer`` (train.py) runs them.

Every random draw of a step comes from generators seeded by (seed, step) for the step's whole global
batch, and each process takes its slice: so 2 processes x batch 2 see exactly the draws of 1 x 4,
and a resumed run the draws of an uninterrupted one.
"""

from __future__ import annotations

import torch

from sdlite.data.cache import sample_latents
from sdlite.data.samplers import seeded_generator


class Denoiser(torch.nn.Module):
    """ε_θ(x_t, t, c): the U-Net, with the text encoder in front when it trains too (so DDP wraps both).
    A model family whose c is richer overrides ``encode`` and ``predict`` (training/family_sdxl.py)."""

    def __init__(self, unet, text_encoder=None, channels_last: bool = False):
        super().__init__()
        self.unet, self.text_encoder, self.channels_last = unet, text_encoder, channels_last

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text) -> torch.Tensor:
        if self.text_encoder is not None:
            text = self.encode(text)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.predict(x_t, t, text)

    def encode(self, text: torch.Tensor) -> torch.Tensor:
        """c from the token ids the trained encoder reads: (B, L) -> embeddings (B, L, D)."""
        return self.text_encoder(text)[0]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, encoder_hidden_states=text).sample


def draw_step(seed: int, caption_dropout: float, noise_offset: float, step: int, G: int, T: int,
              latent_shape: tuple[int, int, int], device) -> dict:  # fmt: skip
    """The random draws of one optimizer step for its whole global batch of G latents (C, h, w), T the
    diffusion's length (each process takes its slice)."""
    cpu = seeded_generator(seed, "step", step)
    dev = seeded_generator(seed, "noise", step, device=device)
    draws = {  # Algorithm 1, lines 3-4
        "t": torch.randint(0, T, (G,), generator=cpu),  # t ~ U{0..T-1}; stays on the CPU (see diffusion_loss)
        "drop": (torch.rand(G, generator=cpu) < caption_dropout).to(device),
        "noise": torch.randn((G, *latent_shape), generator=dev, device=device),  # ε
        "latent_noise": torch.randn((G, *latent_shape), generator=dev, device=device),  # for z ~ q(z|x)
    }
    if noise_offset:
        offset = torch.randn((G, latent_shape[0], 1, 1), generator=dev, device=device)
        draws["noise"] = draws["noise"] + noise_offset * offset
    return draws


def latents_of(batch: dict, vae, latent_noise: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, line 2 in latent space: x_0 = to_latents(z), z ~ q(z|x) drawn as mean + std * noise
    with the step's own noise (sdlite.data.cache.sample_latents), mean and std from the cache or the VAE."""
    if "pixels" in batch:
        with torch.no_grad():
            posterior = vae.encode(batch["pixels"]).latent_dist
        moments = {"mean": posterior.mean, "std": posterior.std}
    else:
        moments = batch
    return sample_latents(moments, latent_noise, vae.config)


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Hang et al. 2023: min(SNR, γ)/SNR for an ε-loss (1 at SNR 0, its limit); min(SNR, γ)/(SNR+1) for v."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def diffusion_loss(
    model, scheduler, x0, text, t, noise, snr_gamma: float | None = None, per_example: bool = False,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Algorithm 1, line 5: mean over the batch of w(t) ‖target - model(x_t, t, c)‖² (per element);
    with ``per_example`` each example's (B,), for a loss that weighs examples apart (DreamBooth's).
    ``extra``: channels the model reads beside x_t (an inpainting U-Net's mask and masked image's
    latents, training/inpaint_step.py)."""
    # t stays on the CPU, where the scheduler's float64 tables are: gathering there costs no device sync.
    x_t = scheduler.add_noise(x0, noise, t)  # eq. 4: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
    kind = scheduler.config.prediction_type
    target = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    x_in = x_t if extra is None else torch.cat([x_t, extra.to(x_t.dtype)], dim=1)
    prediction = model(x_in, t.to(x0.device, non_blocking=True), text)
    loss = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # eq. 14, per sample
    if snr_gamma:
        loss = loss * min_snr_weight(scheduler.snr(t), snr_gamma, kind).to(loss.device)
    return loss if per_example else loss.mean()
