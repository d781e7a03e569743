"""The U-Net trainer's step (Ho et al. 2020, Algorithm 1, on latents), its validation and its final folder.

Every random draw of a step comes from generators seeded by (seed, step) for the step's whole global
batch, and each process takes its slice: so 2 processes x batch 2 see exactly the draws of 1 x 4,
and a resumed run the draws of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path

import torch

from sdlite import images
from sdlite.ddpm import DDPMScheduler
from sdlite.lora import save_lora
from sdlite.models import save_components
from sdlite.training.checkpoint import publish_dir
from sdlite.training.config import save_yaml
from sdlite.training.loop import log_image, seeded_generator


class Denoiser(torch.nn.Module):
    """ε_θ(x_t, t, c): the U-Net, with the text encoder in front when it trains too (so DDP wraps both)."""

    def __init__(self, unet, text_encoder=None, channels_last: bool = False):
        super().__init__()
        self.unet, self.text_encoder, self.channels_last = unet, text_encoder, channels_last

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.text_encoder is not None:
            text = self.text_encoder(text)[0]  # token ids (B, L) -> embeddings (B, L, D)
        if self.channels_last:
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        return self.unet(x_t, t, encoder_hidden_states=text).sample


def draw_step(run, step: int) -> dict[str, torch.Tensor]:
    """The random draws of one optimizer step for its whole global batch G (each process takes its slice)."""
    cfg, device = run.cfg, run.accelerator.device
    G, T = run.sampler.global_batch, run.parts.scheduler.config.num_train_timesteps
    cpu = seeded_generator(cfg.seed, "step", step)
    dev = seeded_generator(cfg.seed, "noise", step, device=device)
    draws = {  # Algorithm 1, lines 3-4
        "t": torch.randint(0, T, (G,), generator=cpu),  # t ~ U{0..T-1}; stays on the CPU (see diffusion_loss)
        "drop": (torch.rand(G, generator=cpu) < cfg.caption_dropout).to(device),
        "noise": torch.randn((G, *run.latent_shape), generator=dev, device=device),  # ε
        "latent_noise": torch.randn((G, *run.latent_shape), generator=dev, device=device),  # for z ~ q(z|x)
    }
    if cfg.noise_offset:
        offset = torch.randn((G, run.latent_shape[0], 1, 1), generator=dev, device=device)
        draws["noise"] = draws["noise"] + cfg.noise_offset * offset
    return draws


def latents_of(batch: dict, vae, latent_noise: torch.Tensor) -> torch.Tensor:
    """Algorithm 1, line 2 in latent space: x_0 = scaling_factor * (z - shift), z ~ q(z|x) drawn as
    mean + std * noise (diffusers' latent_dist.sample()), with mean and std from the cache or the VAE."""
    if "pixels" in batch:
        with torch.no_grad():
            posterior = vae.encode(batch["pixels"]).latent_dist
        mean, std = posterior.mean, posterior.std
    else:
        mean, std = batch["mean"], batch["std"]
    z = mean + std * latent_noise
    shift = vae.config.get("shift_factor") or 0.0
    return (z - shift) * vae.config.scaling_factor


def text_condition(batch: dict, text_encoder, empty: torch.Tensor, drop: torch.Tensor, trains: bool):
    """c: cached embeddings, or token ids (encoded here when frozen, by the Denoiser when trained), with
    the empty caption where ``drop``."""
    if "embeds" in batch:
        return torch.where(drop[:, None, None], empty, batch["embeds"])
    ids = torch.where(drop[:, None], empty, batch["input_ids"])
    if trains:
        return ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Hang et al. 2023: min(SNR, γ)/SNR for an ε-loss (1 at SNR 0, its limit); min(SNR, γ)/(SNR+1) for v."""
    clipped = snr.clamp(max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return torch.where(snr > 0, clipped / snr.clamp(min=1e-20), torch.ones_like(snr))


def diffusion_loss(model, scheduler, x0, text, t, noise, snr_gamma: float | None = None) -> torch.Tensor:
    """Algorithm 1, line 5: mean over the batch of w(t) ‖target - model(x_t, t, c)‖² (per element)."""
    # t stays on the CPU, where the scheduler's float64 tables are: gathering there costs no device sync.
    x_t = scheduler.add_noise(x0, noise, t)  # eq. 4: x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε
    kind = scheduler.config.prediction_type
    target = noise if kind == "epsilon" else scheduler.get_velocity(x0, noise, t)
    prediction = model(x_t, t.to(x0.device, non_blocking=True), text)
    loss = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # eq. 14, per sample
    if snr_gamma:
        loss = loss * min_snr_weight(scheduler.snr(t), snr_gamma, kind).to(loss.device)
    return loss.mean()


def optimizer_step(run, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over gradient_accumulation_steps micro-batches: (mean loss, non-finite flag),
    both on the device. A step whose loss or gradients are NaN or inf changes nothing (see skip_update)."""
    cfg, acc, parts = run.cfg, run.accelerator, run.parts
    draws = draw_step(run, step)
    total = torch.zeros((), device=acc.device)
    nonfinite = torch.zeros((), dtype=torch.bool, device=acc.device)
    for micro in range(cfg.gradient_accumulation_steps):
        batch = {k: v.to(acc.device, non_blocking=True) for k, v in next(run.batches).items()}
        mine = {k: v[run.sampler.positions(micro)] for k, v in draws.items()}
        with acc.accumulate(run.model):
            with acc.autocast():
                x0 = latents_of(batch, parts.vae, mine["latent_noise"])
                text = text_condition(
                    batch, parts.text_encoder, run.empty_text, mine["drop"], cfg.text_encoder_trains
                )
            loss = diffusion_loss(
                run.model, parts.scheduler, x0, text, mine["t"], mine["noise"], cfg.snr_gamma
            )
            acc.backward(loss)
            total += loss.detach()
            if acc.sync_gradients:
                nonfinite = skip_update(run, ~torch.isfinite(total))
                run.optimizer.step()
                if not acc.optimizer_step_was_skipped:  # fp16 overflow: no step, so the schedule waits
                    run.lr_schedule.step()
                run.optimizer.zero_grad(set_to_none=True)
                vars(run.optimizer.optimizer).pop("found_inf", None)
    if run.ema is not None:
        run.ema.update(run.params)
    return total / cfg.gradient_accumulation_steps, nonfinite


def skip_update(run, bad_loss: torch.Tensor) -> torch.Tensor:
    """Clip the gradients and arrange for the coming optimizer step to change nothing if the loss or the
    gradients are not finite; returns that flag (on the device), for the loop to count.

    Without a host sync: the flag goes to the optimizer as ``found_inf``, the tensor by which torch's
    fused Adam/AdamW kernels skip a step on the device (moments, step count and weights untouched), as
    GradScaler uses them. The gradient norm is taken after DDP's all-reduce, so every process makes the
    same choice. Under fp16 the GradScaler already skips steps with inf gradients (its scale search
    makes a few) and sets found_inf itself; the flag then only counts non-finite losses. Other
    optimizers (bitsandbytes, non-fused AdamW) have no found_inf: for them the flag is read on the host,
    one sync per step.
    """
    acc, cfg = run.accelerator, run.cfg
    if acc.scaler is not None:
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
        return bad_loss
    if cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None])
    # A non-finite loss makes non-finite gradients; the norm alone decides, as it is the same everywhere.
    bad = ~torch.isfinite(norm.to(bad_loss.device))
    optimizer = run.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = bad.float()
    elif bad.item():
        optimizer.zero_grad(set_to_none=True)  # no gradients: the optimizer skips every parameter
    return bad | bad_loss


# ---- validation ---------------------------------------------------------------------------------------


def held_out_loss(run, denoiser) -> dict[str, float]:
    """The unweighted loss on held-out data at fixed timesteps, with noise fixed for the whole run."""
    val, acc, parts, cfg = run.val, run.accelerator, run.parts, run.cfg
    logs = {}
    for k, t in enumerate(val["timesteps"]):
        total = 0.0
        for rows in torch.arange(len(val["noise"][k])).split(cfg.train_batch_size):
            batch = {name: value[rows] for name, value in val["batch"].items()}
            x0 = latents_of(batch, parts.vae, val["latent_noise"][rows])
            keep = torch.zeros(len(rows), dtype=torch.bool, device=acc.device)  # no caption dropout
            text = text_condition(batch, parts.text_encoder, run.empty_text, keep, cfg.text_encoder_trains)
            ts = torch.full((len(rows),), t)
            loss = diffusion_loss(denoiser, parts.scheduler, x0, text, ts, val["noise"][k][rows])
            total += loss.item() * len(rows)
        logs[f"val/loss_t{t}"] = total / len(val["noise"][k])
    logs["val/loss"] = sum(logs.values()) / len(logs)
    return logs


def sample_images(run) -> list:
    """One image per validation prompt, each from its own fixed seed, with sdlite's pipeline."""
    from sdlite.pipelines import TextToImagePipeline  # training may use pipelines; sdlite never does

    parts, cfg, device = run.parts, run.cfg, run.accelerator.device
    pipe = TextToImagePipeline(
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        unet=parts.unet,
        scheduler=DDPMScheduler.from_config(parts.scheduler.config),
    )
    pipe.set_progress_bar_config(disable=True)
    generators = [
        torch.Generator(device).manual_seed(cfg.seed + i) for i in range(len(cfg.validation_prompts))
    ]
    return pipe(
        list(cfg.validation_prompts),
        num_inference_steps=cfg.validation_inference_steps,
        guidance_scale=cfg.validation_guidance,
        generator=generators,
        output_type="pil",
    ).images


def ema_weights(run):
    return run.ema.swapped_into(run.params) if run.ema is not None else contextlib.nullcontext()


@torch.no_grad()
def validate(run, step: int) -> dict[str, float]:
    """Held-out loss and a grid of the validation prompts, with the EMA weights when there are any."""
    acc, cfg = run.accelerator, run.cfg
    if not acc.is_main_process or (run.val is None and not cfg.validation_prompts):
        return {}
    denoiser = acc.unwrap_model(run.model).eval()  # unwrapped: no DDP collectives on one process
    logs = {}
    with ema_weights(run), acc.autocast():
        if run.val is not None:
            logs = held_out_loss(run, denoiser)
        if cfg.validation_prompts:
            n = len(cfg.validation_prompts)
            grid = images.grid(sample_images(run), rows=math.ceil(n / 8))  # at most 8 a row
            path = Path(cfg.output_dir) / "validation" / f"step-{step}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            log_image(acc, "validation", grid, step)
    denoiser.train()
    if logs:
        acc.log(logs, step=step)
        acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in logs.items()))
    return logs


def save_final(run) -> Path:
    """The diffusers-layout folder (EMA weights in unet/ and text_encoder/; raw ones in *_raw/), or with
    LoRA pytorch_lora_weights.safetensors; written atomically, with the run's config as train_config.yaml."""
    acc, cfg, parts = run.accelerator, run.cfg, run.parts
    final = Path(cfg.final_dir or Path(cfg.output_dir) / "final")
    acc.wait_for_everyone()
    if acc.is_main_process:
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.lora:  # only the adapters, in the file load_lora_weights reads, naming the base model
            te = parts.text_encoder if cfg.lora_text_encoder else None
            save_lora(tmp, parts.unet, te, base_model=cfg.pretrained or f"sdlite preset {cfg.preset}")
        else:
            if run.ema is not None:
                parts.unet.save_pretrained(tmp / "unet_raw")
                if cfg.train_text_encoder:
                    parts.text_encoder.save_pretrained(tmp / "text_encoder_raw")
            with ema_weights(run):
                save_components(parts, tmp)
        save_yaml(cfg, tmp / "train_config.yaml")
        publish_dir(tmp, final)
        acc.print(f"saved {final}")
    acc.wait_for_everyone()
    return final
