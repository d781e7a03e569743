"""The step of latent consistency distillation (Luo et al. 2023, Algorithm 1, with sdlite/lcm.py's math):
the U-Net trainer's step when ``distill: lcm``, beside Algorithm 1 of Ho et al. (training/unet_step.py).

For each example of the batch, with its latents z_0 and caption c:
    n ~ U{0..N-1}, ω ~ U[w_min, w_max], ε ~ N(0, I)         the step's draws (seeded by seed and step)
    z_{t_{n+k}} = α(t_{n+k}) z_0 + σ(t_{n+k}) ε               eq. 4 of Ho et al. (scheduler.add_noise)
    ẑ_0, ε̂ = (1+ω) teacher(z, c) - ω teacher(z, ∅)            guided estimates at t_{n+k} (no grad)
    ẑ_{t_n} = α(t_n) ẑ_0 + σ(t_n) ε̂                           one DDIM step of the teacher's ODE
              (lcm_solver heun: corrected by the guided ε̂ at t_n of that point, Heun's step)
    loss = d(f_θ(z_{t_{n+k}}, t_{n+k}), f_θ⁻(ẑ_{t_n}, t_n))    pseudo-Huber; θ⁻ = sg(EMA of θ)

The teacher is the pretrained model the run loads: with a LoRA student the same U-Net with its adapter
scaled to 0 (no second copy in memory), with a full-weight student a frozen copy made before training.

The target f_θ⁻ is, as in LCM's Algorithm 1, an exponential moving average of the student:
θ⁻ ← sg(μ θ⁻ + (1 - μ) θ) after every optimizer step (``lcm_target_decay`` μ, 0.95 as the paper's), kept
beside the trained weights (the adapter's few megabytes for a LoRA student) and saved in checkpoints.
μ = 0 makes the target the student itself under no_grad, LCM-LoRA's published choice. On the demo's model
the average read more shapes right at 4 steps than the student itself (benchmarks/RESULTS.md, "Four
steps instead of fifty"): a target that trails the student does not chase the student's last update.
The loop's EMA (``ema_decay``, full-weight students only) is apart: it gives the weights final_dir holds.

The student does not read ω (no guidance embedding): it learns the teacher guided with ω drawn
around the range, as LCM-LoRA's adapter does, and samples without guidance (guidance_scale 1).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

from sdlite.data.samplers import seeded_generator
from sdlite.lcm import (
    SkippingSchedule,
    consistency_function,
    ddim_step,
    guided,
    heun_step,
    pseudo_huber,
    x0_and_eps,
)
from sdlite.lora import adapter_scale
from training.checkpoint import find_resume
from training.config.distill import DistillSection
from training.optim import EMA
from training.resume import saved_config


def written_before_the_target(output_dir: str, resume: str | None, decay: float) -> str | None:
    """One line if the checkpoint ``resume`` names comes from a distillation of before the EMA target (its
    config has no lcm_target_decay, its folder no lcm_target): the average it would need was never kept."""
    checkpoint = find_resume(output_dir, resume) if decay > 0 else None
    saved = saved_config(checkpoint) if checkpoint is not None else None
    if saved is None or "lcm_target_decay" in saved:
        return None
    return (
        f"{checkpoint} was written by a distillation of before lcm_target_decay, whose target was the "
        "student itself: resume it with --lcm_target_decay 0, as it was trained, or start a new output_dir"
    )


class TargetNetwork(torch.nn.Module):
    """θ⁻ of LCM Algorithm 1: θ⁻ ← sg(μ θ⁻ + (1 - μ) θ) after each optimizer step, from θ⁻ = θ at the start,
    without the warm-up of the loop's EMA (the paper's μ from the first step). A Module whose buffers are
    the averages, so a checkpoint writes and a resume restores it as it does the trained weights."""

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        super().__init__()
        self.parameters_averaged = parameters
        self.average = EMA(parameters, decay, warmup=False)
        for i, shadow in enumerate(self.average.shadow):  # the same tensors: a checkpoint's load fills both
            self.register_buffer(f"average_{i}", shadow)

    def update(self) -> None:
        self.average.update(self.parameters_averaged)

    def swapped_in(self):
        """Inside the block the student's parameters hold θ⁻."""
        return self.average.swapped_into(self.parameters_averaged)


class ConsistencyDistillation:
    """The distillation's draws and loss for a student ``denoiser`` (training/unet_step.py's Denoiser,
    unwrapped), of the teacher: the same model with its adapter off (``lora``) or a frozen copy."""

    def __init__(self, settings: DistillSection, scheduler, denoiser: torch.nn.Module, lora: bool,
                 zero_unconditional: bool = False):  # fmt: skip
        self.settings, self.denoiser = settings, denoiser
        self.prediction_type = scheduler.config.prediction_type
        self.schedule = SkippingSchedule.of(
            torch.as_tensor(scheduler.alphas_cumprod), settings.lcm_ddim_steps
        )
        self.scheduler = scheduler
        # SDXL base samples its unconditional half with zeros (force_zeros_for_empty_prompt): the teacher's
        # ∅ is then what its pipeline feeds, not the empty caption's embeddings.
        self.zero_unconditional = zero_unconditional
        if lora:
            self.teacher = functools.partial(self.without_adapter, denoiser)
        else:
            frozen = copy.deepcopy(denoiser.unet).requires_grad_(False).eval()
            self.teacher = type(denoiser)(frozen, channels_last=denoiser.channels_last)
        self.target: TargetNetwork | None = None  # start_target, once the weights are the same everywhere

    def start_target(self, trained: list[torch.nn.Parameter]) -> None:
        """θ⁻ = θ of the ``trained`` parameters, with μ > 0: called after accelerate's prepare, whose DDP
        gives every process the main process's weights (an average begun before would keep each
        process's own initialisation)."""
        if self.settings.lcm_target_decay > 0:
            self.target = TargetNetwork(trained, self.settings.lcm_target_decay)

    def update_target(self) -> None:
        """After an optimizer step: θ⁻ moves toward θ (nothing with μ = 0: the target is the student)."""
        if self.target is not None:
            self.target.update()

    def target_weights(self):
        """Inside the block the student holds θ⁻ (its own weights with μ = 0)."""
        return self.target.swapped_in() if self.target is not None else contextlib.nullcontext()

    @staticmethod
    def without_adapter(denoiser, x, t, text):
        with adapter_scale(denoiser.unet, scale=0.0):  # W + 0·BA: the frozen base's exact output
            return denoiser(x, t, text)

    def draw(self, seed: int, step: int, G: int, device) -> dict:
        """The step's own draws for its global batch of G (each process takes its slice, as unet_step's):
        the solver step index n and the guidance ω."""
        cpu = seeded_generator(seed, "lcm", step)
        s = self.settings
        return {
            "solver_index": torch.randint(0, len(self.schedule.timesteps), (G,), generator=cpu),
            "w": (s.lcm_w_min + (s.lcm_w_max - s.lcm_w_min) * torch.rand(G, generator=cpu)).to(device),
        }

    def unconditional(self, uncond):
        """∅ of the teacher's unconditional pass, from the batch's empty-caption condition."""
        if not self.zero_unconditional:
            return uncond
        embeds, pooled, time_ids = uncond
        return torch.zeros_like(embeds), torch.zeros_like(pooled), time_ids

    def guidance(self, start: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """ω, 0 at the solver steps outside lcm_guidance_interval."""
        interval = self.settings.lcm_guidance_interval
        if interval is None:
            return w
        inside = (start >= interval[0]) & (start <= interval[1])
        return torch.where(inside.to(w.device), w, torch.zeros_like(w))

    def guided_teacher(self, z, t, alpha, sigma, text, uncond, w) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's (ẑ_0, ε̂) at z_t guided by ω (LCM sec. 4.2): its conditional and ∅ passes."""
        cond = x0_and_eps(self.teacher(z, t, text).float(), z, alpha, sigma, self.prediction_type)
        blank = x0_and_eps(self.teacher(z, t, self.unconditional(uncond)).float(), z, alpha, sigma,
                           self.prediction_type)  # fmt: skip
        return guided(cond[0], blank[0], w), guided(cond[1], blank[1], w)

    def loss(self, model, z0: torch.Tensor, text, uncond, draws: dict) -> torch.Tensor:
        """The batch's mean consistency loss; gradients reach ``model`` (the prepared student) alone."""
        schedule, device = self.schedule, z0.device
        start, end = schedule.endpoints(draws["solver_index"])  # on the CPU, with the float64 tables
        z_start = self.scheduler.add_noise(z0, draws["noise"], start)  # z_{t_{n+k}}
        a_start, s_start = schedule.alpha_sigma(start)
        a_end, s_end = schedule.alpha_sigma(end)
        t_start, t_end = start.to(device), end.to(device)

        with torch.no_grad():  # the target first: the online pass's graph then sees only θ
            w = self.guidance(start, draws["w"])
            x0, eps = self.guided_teacher(z_start, t_start, a_start, s_start, text, uncond, w)
            z_end = ddim_step(x0, eps, a_end, s_end)  # ẑ_{t_n}: Euler's step in DDIM's variables
            if self.settings.lcm_solver == "heun":  # the slope at t_n of that point too: second order
                _, eps_end = self.guided_teacher(z_end.to(z0.dtype), t_end, a_end, s_end, text, uncond, w)
                z_end = heun_step(z_start.float(), eps, eps_end, a_start, s_start, a_end, s_end)
            z_end = z_end.to(z0.dtype)
            with self.target_weights():
                x0_target, _ = x0_and_eps(self.denoiser(z_end, t_end, text).float(), z_end, a_end, s_end,
                                          self.prediction_type)  # fmt: skip
            target = consistency_function(z_end, x0_target, end)  # f_θ⁻(ẑ_{t_n}, t_n)
        x0_student, _ = x0_and_eps(model(z_start, t_start, text).float(), z_start, a_start, s_start,
                                   self.prediction_type)  # fmt: skip
        online = consistency_function(z_start, x0_student, start)  # f_θ(z_{t_{n+k}}, t_{n+k})
        return pseudo_huber(online, target, self.settings.lcm_huber_c).mean()
