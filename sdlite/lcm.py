"""Latent consistency distillation: the math of Luo et al. 2023, "Latent Consistency Models:
Synthesizing High-Resolution Images with Few-step Inference" (https://arxiv.org/abs/2310.04378), and
of its LoRA form, Luo et al. 2023, "LCM-LoRA: A Universal Stable-Diffusion Acceleration Module"
(https://arxiv.org/abs/2311.05556).

A consistency function f_θ maps any point z_t of a probability-flow ODE trajectory to the trajectory's
start; a few-step sampler (diffusers' ``LCMScheduler``) then alternates f_θ with fresh noise. It is
distilled from a trained diffusion model (the teacher) by making f_θ agree with itself one solver step
apart along the teacher's ODE (LCM Algorithm 1). This module holds each piece of that step as a
function; training/lcm_step.py runs them with the models.

Glossary (paper symbol -> name here)
    T, N                        scheduler.config.num_train_timesteps, ``steps`` (the solver's N)
    k = T / N                   skip: t_{n+k} and t_n are one solver step (k timesteps) apart (sec. 4.3)
    t_{n+k}, t_n                start, end
    α(t) = √ᾱ_t, σ(t) = √(1-ᾱ_t)   alpha, sigma (the forward process z_t = α(t) z_0 + σ(t) ε)
    ω                           w, the guidance: ε̃ = (1 + ω) ε_θ(z, c) - ω ε_θ(z, ∅) (sec. 4.2); a
                                pipeline's guidance_scale s is 1 + ω
    ẑ_0, ε̂                      x0, eps: the teacher's (guided) estimates at z_{t_{n+k}}
    ẑ_{t_n}^{Ψ,ω}               x_end: one step of the solver Ψ (DDIM, or Heun's) of the augmented PF-ODE
                                from z_{t_{n+k}} to t_n
    c_skip(t), c_out(t)         boundary_scalings (sec. 4.1; Song et al. 2023, "Consistency Models")
    f_θ(z, ω, c, t)             consistency_function = c_skip(t) z + c_out(t) ẑ_0(z)
    d(x, y)                     pseudo_huber (Song & Dhariwal 2023, sec. 3.3; LCM-LoRA's distance)

Code timesteps count 0..T-1, as diffusers' and sdlite.ddpm's do. The solver's N timesteps are
k(i + 1) - 1 for i < N (999, 979, ..., 19 for T = 1000, N = 50): exactly the grid ``LCMScheduler``
samples on with ``original_inference_steps = N``, so a model distilled here is sampled on the
timesteps it learnt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# LCMScheduler's constants: f_θ must be parameterised as the sampler that runs it reads it.
SIGMA_DATA = 0.5  # σ_data of Consistency Models' boundary scalings
TIMESTEP_SCALING = 10.0  # code timesteps are scaled by this inside c_skip and c_out (LCMScheduler's)


def _per_example(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) coefficients as (B, 1, 1, 1) in ``like``'s dtype and device, to scale (B, C, h, w) latents."""
    return values.to(like.device, like.dtype).view(-1, *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class SkippingSchedule:
    """The teacher's ODE solver grid of N timesteps, k = T // N apart (LCM sec. 4.3, "skipping-step")."""

    alphas_cumprod: torch.Tensor  # (T,) float64: ᾱ_t of the teacher's noise schedule
    skip: int  # k
    timesteps: torch.Tensor  # (N,) int64: t_{n+k} of each solver step, ascending

    @classmethod
    def of(cls, alphas_cumprod: torch.Tensor, steps: int) -> SkippingSchedule:
        """The grid of ``steps`` (N) solver steps over the T timesteps of ``alphas_cumprod``."""
        T = len(alphas_cumprod)
        if not 1 <= steps <= T:
            raise ValueError(f"the solver's steps must be in 1..{T} (the scheduler's T), got {steps}")
        skip = T // steps
        timesteps = torch.arange(1, steps + 1, dtype=torch.int64) * skip - 1
        return cls(alphas_cumprod.to(torch.float64), skip, timesteps)

    def endpoints(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(t_{n+k}, t_n) of the solver steps ``index`` (B,): t_n = t_{n+k} - k, the lowest clamped to 0,
        where c_skip = 1 and c_out = 0, so the target there is the teacher's step itself."""
        start = self.timesteps[index]
        return start, (start - self.skip).clamp(min=0)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α(t), σ(t)) = (√ᾱ_t, √(1-ᾱ_t)), float64 (B,)."""
        abar = self.alphas_cumprod[t]
        return abar.sqrt(), (1 - abar).sqrt()


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) of LCM sec. 4.1 with Consistency Models' form, t scaled by 10 as LCMScheduler:
    c_skip = σ_d² / ((10t)² + σ_d²), c_out = 10t / √((10t)² + σ_d²); so c_skip(0) = 1, c_out(0) = 0, the
    boundary condition f(z, 0) = z, and c_skip ≈ 0 from the first solver step on."""
    scaled = TIMESTEP_SCALING * t.to(torch.float64)
    c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
    return c_skip, c_out


def x0_and_eps(
    output: torch.Tensor, z_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ẑ_0, ε̂) from a U-Net's output at z_t = α z_0 + σ ε: for ε-prediction ẑ_0 = (z_t - σ ε̂) / α
    (the LCM parameterisation of sec. 4.1); for v-prediction (Salimans & Ho 2022) ẑ_0 = α z_t - σ v and
    ε̂ = σ z_t + α v."""
    a, s = _per_example(alpha, z_t), _per_example(sigma, z_t)
    if prediction_type == "epsilon":
        return (z_t - s * output) / a, output
    if prediction_type == "v_prediction":
        return a * z_t - s * output, s * z_t + a * output
    raise ValueError(
        f"prediction_type {prediction_type!r}: consistency distillation reads epsilon or v_prediction"
    )


def guided(conditional: torch.Tensor, unconditional: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance in LCM's form (sec. 4.2): (1 + ω) x_c - ω x_∅, per example ω (B,).
    Linear, so it applies to ẑ_0 and ε̂ alike."""
    return conditional + _per_example(w, conditional) * (conditional - unconditional)


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, alpha_end: torch.Tensor, sigma_end: torch.Tensor
) -> torch.Tensor:
    """ẑ_{t_n}^{Ψ,ω}: one DDIM step (Song et al. 2021, eq. 12 with η = 0; LCM's solver Ψ, sec. 4.2-4.3) of the
    augmented PF-ODE from z_{t_{n+k}}, given its guided estimates: α(t_n) ẑ_0 + σ(t_n) ε̂."""
    return _per_example(alpha_end, x0) * x0 + _per_example(sigma_end, eps) * eps


def heun_step(
    z_start: torch.Tensor,
    eps_start: torch.Tensor,
    eps_end: torch.Tensor,
    alpha_start: torch.Tensor,
    sigma_start: torch.Tensor,
    alpha_end: torch.Tensor,
    sigma_end: torch.Tensor,
) -> torch.Tensor:
    """ẑ_{t_n}^{Ψ,ω} by Heun's second-order step (Karras et al. 2022, Algorithm 1, lines 5-8) of the same
    PF-ODE, a second-order Ψ as LCM sec. 4.3 allows (its table compares DDIM, DPM-Solver and PLMS). In
    DDIM's variables x̄ = z / α, σ̄ = σ / α the ODE is dx̄ / dσ̄ = ε(z, t) (Song et al. 2021, eq. 14), so
    DDIM is its Euler step and Heun's averages the slope at both ends: x̄_n = x̄_{n+k} + (σ̄_n - σ̄_{n+k})
    (ε̂_{n+k} + ε̂_n) / 2, with ε̂_n the guided ε at t_n of the Euler (DDIM) step's point."""
    a_start, a_end = _per_example(alpha_start, z_start), _per_example(alpha_end, z_start)
    step = _per_example(sigma_end / alpha_end - sigma_start / alpha_start, z_start)
    return a_end * (z_start / a_start + step * (eps_start + eps_end) / 2)


def consistency_function(z_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """f_θ(z, ω, c, t) = c_skip(t) z + c_out(t) ẑ_0 (LCM sec. 4.1): the trajectory's start as estimated
    from z_t, exactly z_t at t = 0."""
    c_skip, c_out = boundary_scalings(t)
    return _per_example(c_skip, z_t) * z_t + _per_example(c_out, x0) * x0


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float) -> torch.Tensor:
    """d(x, y) = √((x - y)² + c²) - c per element, averaged per example (B,): quadratic below c, linear
    above (Song & Dhariwal 2023, sec. 3.3), per element as LCM-LoRA's distillation measures it."""
    diff = x.float() - y.float()
    return ((diff.square() + c * c).sqrt() - c).flatten(1).mean(1)
