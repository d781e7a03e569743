"""DDPM: the Gaussian diffusion of Ho et al. 2020, "Denoising Diffusion Probabilistic Models".

A drop-in for diffusers' ``DDPMScheduler`` (same config keys, same ``step``/``add_noise``, same
random draws), written in the paper's notation so it can be read next to the paper, plus the
variational bound of eq. 5 so a model's likelihood can be measured in bits per dimension.

Indexing: the paper counts t = 1..T; code counts t = 0..T-1 (code t = paper t - 1), as diffusers
does. So code t = 0 is the paper's last reverse step, whose loss is the decoder term L_0.

Glossary (paper symbol -> attribute / argument)
    T                                   config.num_train_timesteps
    β_t                                 betas
    α_t = 1 - β_t                       alphas
    ᾱ_t = Π_{s<=t} α_s                  alphas_cumprod
    ᾱ_{t-1}, with ᾱ_{-1} := 1           alphas_cumprod_prev
    √ᾱ_t, √(1-ᾱ_t)                      sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod
    1/√ᾱ_t, √(1/ᾱ_t - 1)                sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod
    β̃_t  (eq. 7)                        posterior.variance
    μ̃_t = c_0 x_0 + c_t x_t  (eq. 7)    posterior.coef_x0, posterior.coef_xt
    σ_t²  (Algorithm 2)                 the variance returned by p_mean_variance
    x_0, x_t, ε                         x0, x_t, eps (diffusers: original_samples, sample, noise)
    x̂_0  (eq. 15)                       pred_x0 (diffusers: pred_original_sample)
    v = √ᾱ_t ε - √(1-ᾱ_t) x_0           v (Salimans & Ho 2022, "Progressive Distillation", sec. 4)
    SNR(t) = ᾱ_t / (1 - ᾱ_t)            snr(t) (Kingma et al. 2021, "Variational Diffusion Models")
    L_T, L_{t-1}, L_0  (eq. 5)          prior_kl, vb_term
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclass
class DDPMSchedulerOutput(BaseOutput):
    prev_sample: torch.Tensor  # x_{t-1} ~ p_θ(x_{t-1} | x_t), the next model input
    pred_original_sample: torch.Tensor | None = None  # x̂_0, after clipping/thresholding


@dataclass
class VariationalBound:
    total_bpd: torch.Tensor  # (B,) L_T + Σ_t weight_t L_{t-1} + L_0 in bits per dimension (eq. 5)
    prior_bpd: torch.Tensor  # (B,) L_T
    terms_bpd: torch.Tensor  # (B, T) column t: the term of step t -> t-1 (column 0: L_0); 0 if skipped
    weights: torch.Tensor  # (T,) how many terms each computed column stands for (0: skipped)
    eps_mse: torch.Tensor  # (B,) ||ε - ε_θ(x_t, t)||² at the same draws, weighted alike: E_t of it

    @property
    def diffusion_bpd(self) -> torch.Tensor:
        """(B,) Σ_{t>1} L_{t-1}: the weighted terms between the prior and the decoder."""
        return (self.terms_bpd[:, 1:] * self.weights[1:]).sum(1)


def bound_timesteps(T: int, stride: int = 1, dense_below: int = 1, offset: int = 0) -> list[tuple[int, int]]:
    """(t, weight) of the eq. 5 terms to compute: every t < dense_below with weight 1 (t = 0 is L_0,
    always computed), then every ``stride``-th t from ``dense_below + offset`` with weight ``stride``.

    With ``offset`` uniform over 0..stride-1 each tail term is kept with probability 1/stride, so the
    weighted sum is an unbiased estimate of the full one. The terms of the first few steps are most
    of the sum for a trained model: computing them all and sampling only the long, small tail
    (dense_below > 1) lowers the estimate's variance.
    """
    if stride < 1 or not 0 <= offset < stride or dense_below < 1:
        raise ValueError(
            f"need stride >= 1, 0 <= offset < stride and dense_below >= 1 (t = 0 is the decoder term), "
            f"got stride={stride}, offset={offset}, dense_below={dense_below}"
        )
    dense = [(t, 1) for t in range(min(dense_below, T))]
    return dense + [(t, stride) for t in range(dense_below + offset, T, stride)]


# Beta schedules: each returns β_1..β_T in float64.
def linear_betas(beta_start: float, beta_end: float, T: int) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)  # Ho et al. sec. 4


def scaled_linear_betas(beta_start: float, beta_end: float, T: int) -> torch.Tensor:
    # Latent diffusion (Rombach et al. 2022): linear in √β, which keeps more signal at large t.
    return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2); β_t = 1 - ᾱ(t)/ᾱ(t-1),
    # capped below 1 because β_T = 1 would make x_T independent of everything (and 1/√ᾱ infinite).
    alpha_bar = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    # Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1: shift
    # √ᾱ so that √ᾱ_T = 0 (pure noise at T, as sampling assumes), then scale so √ᾱ_1 is unchanged.
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1 - alphas


class GaussianPosterior(NamedTuple):
    """q(x_prev | x_t, x_0) = N(coef_x0·x_0 + coef_xt·x_t, variance) for each step of a chain (eqs. 6-7)."""

    beta: torch.Tensor  # β of the step prev -> t: 1 - ᾱ_t/ᾱ_prev (β_t itself when prev = t-1)
    variance: torch.Tensor  # β̃_t
    log_variance_clipped: torch.Tensor
    coef_x0: torch.Tensor
    coef_xt: torch.Tensor


def gaussian_posterior(alphas_cumprod: torch.Tensor, alphas_cumprod_prev: torch.Tensor) -> GaussianPosterior:
    """Eqs. 6-7 for the steps prev -> t of a chain, given ᾱ_t and ᾱ_prev in order of increasing t.

    Written with ᾱ_prev rather than ᾱ_{t-1} because sampling with fewer steps skips timesteps: the
    forward jump prev -> t is itself Gaussian with β = 1 - ᾱ_t/ᾱ_prev (eq. 4 divided through), so
    the same formulas give the posterior of the shorter chain.
    """
    beta = 1 - alphas_cumprod / alphas_cumprod_prev
    one_minus_ab = 1 - alphas_cumprod
    variance = beta * (1 - alphas_cumprod_prev) / one_minus_ab  # eq. 7: β̃_t
    # β̃ is 0 on the last step of a chain (ᾱ_prev = 1); its log would be -inf in the decoder term,
    # so, as improved-diffusion does, the log uses the next step's variance there.
    log_variance_clipped = torch.log(
        torch.cat([variance[1:2], variance[1:]]) if len(variance) > 1 else variance
    )
    coef_x0 = alphas_cumprod_prev.sqrt() * beta / one_minus_ab  # eq. 7: μ̃_t, weight of x_0
    coef_xt = (1 - beta).sqrt() * (1 - alphas_cumprod_prev) / one_minus_ab  # eq. 7: μ̃_t, weight of x_t
    return GaussianPosterior(beta, variance, log_variance_clipped, coef_x0, coef_xt)


_ON_DEVICE: dict[tuple, tuple] = {}  # (id(table), device, dtype) -> (weakref to table, table there)


def _table_on(table: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``table`` cast to dtype on device, made once per (table, device, dtype) and kept."""
    key = (id(table), device, dtype)
    hit = _ON_DEVICE.get(key)
    if hit is None or hit[0]() is not table:
        hit = (weakref.ref(table), table.to(device=device, dtype=dtype))
        _ON_DEVICE[key] = hit
    return hit[1]


def extract(table: torch.Tensor, t, x: torch.Tensor) -> torch.Tensor:
    """table[t] cast to x's dtype and device, shaped to broadcast against x ((B,) t -> (B, 1, 1, 1)).

    The tables are float64 on the CPU (MPS has no float64). A t already on x's accelerator (training
    draws t there) is gathered there, from a cached copy of the table in x's dtype: no host sync per
    call. A Python or CPU t (the sampling loop) is gathered on the CPU and only the values travel.
    Either way the values are the float64 ones rounded once to x's dtype.
    """
    if isinstance(t, torch.Tensor) and t.device.type != "cpu":
        values = _table_on(table, t.device, x.dtype)[t.long()].to(x.device)
    else:
        values = table[torch.as_tensor(t, device="cpu").long()].to(device=x.device, dtype=x.dtype)
    return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


# The longest training chain a config may ask for: 100x Stable Diffusion's 1000. The scheduler keeps
# about 20 float64 tables of this length (and set_timesteps more), so 10**8 steps would take ~16 GB.
MAX_TRAIN_TIMESTEPS = 100_000


def check_num_train_timesteps(T) -> None:
    """Refuse a training-chain length that is not an int in [1, MAX_TRAIN_TIMESTEPS], before any table."""
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or not 1 <= T <= MAX_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps must be an int in [1, {MAX_TRAIN_TIMESTEPS}], got {T!r}: the scheduler "
            "holds tables of that length (Stable Diffusion uses 1000); fix scheduler_config.json"
        )


class DDPMScheduler(SchedulerMixin, ConfigMixin):
    """Ho et al. 2020 DDPM, with diffusers' DDPMScheduler config keys and step/add_noise semantics."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1  # one model call per step

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        # Every option is read from self.config when used, not copied here: pipelines edit the config
        # after construction (StableDiffusionPipeline forces steps_offset=1 and clip_sample=False).
        if variance_type not in VARIANCE_TYPES:
            raise NotImplementedError(f"variance_type={variance_type!r}; supported: {VARIANCE_TYPES}")
        check_num_train_timesteps(num_train_timesteps)
        T = num_train_timesteps
        if trained_betas is not None:
            betas = torch.as_tensor(np.asarray(trained_betas), dtype=torch.float64)
        elif beta_schedule == "linear":
            betas = linear_betas(beta_start, beta_end, T)
        elif beta_schedule == "scaled_linear":
            betas = scaled_linear_betas(beta_start, beta_end, T)
        elif beta_schedule == "squaredcos_cap_v2":
            betas = cosine_betas(T)
        else:
            raise NotImplementedError(f"beta_schedule={beta_schedule!r}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)

        # All coefficients are computed once, in float64, and cast to the caller's dtype on use.
        self.betas = betas
        self.alphas = 1 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])

        # q(x_t | x_0)  (eq. 4)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.snr_table = self.alphas_cumprod / (1 - self.alphas_cumprod)

        # x_0 from x_t and ε  (eq. 4 solved for x_0 = eq. 15). With a zero-terminal-SNR schedule
        # ᾱ_T = 0 and these are inf at T: only v- or x_0-prediction can be sampled from there.
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()

        # q(x_{t-1} | x_t, x_0)  (eqs. 6-7) along the training chain; sampling with fewer steps uses
        # the posterior between visited timesteps instead (step_posterior, set by set_timesteps).
        self.posterior = gaussian_posterior(self.alphas_cumprod, self.alphas_cumprod_prev)
        self.step_posterior = self.posterior
        self.prev_timesteps = torch.arange(T) - 1

        self.init_noise_sigma = 1.0  # x_T ~ N(0, I): the sampler starts from unit-variance noise
        self.num_inference_steps = None
        self.custom_timesteps = False
        self.timesteps = torch.arange(T - 1, -1, -1)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample  # DDPM feeds x_t to the model as is (Karras-style samplers rescale it)

    # ---- forward process ---------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0): eq. 4, reparameterised as x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε (sec. 3.2)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (
            extract(self.sqrt_alphas_cumprod, t, x0) * x0
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """diffusers' name for q_sample; the caller owns the noise because it is the training target."""
        return self.q_sample(original_samples, timesteps, noise)

    def snr(self, t) -> torch.Tensor:
        """SNR(t) = ᾱ_t / (1 - ᾱ_t) as float32 on t's device (min-SNR loss weighting uses it)."""
        t = torch.as_tensor(t)
        return self.snr_table[t.cpu().long()].to(device=t.device, dtype=torch.float32)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t, respaced: bool = False):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) (eqs. 6-7).

        respaced=True gives the posterior between t and previous_timestep(t), the chain that step()
        walks after set_timesteps, instead of the training chain's t-1.
        """
        post = self.step_posterior if respaced else self.posterior
        mean = extract(post.coef_x0, t, x_t) * x0 + extract(post.coef_xt, t, x_t) * x_t  # eq. 7
        return mean, extract(post.variance, t, x_t), extract(post.log_variance_clipped, t, x_t)

    # ---- conversions between what a model may predict: ε, x_0, v ------------------------------

    def predict_x0_from_eps(self, x_t: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        # eq. 15: x̂_0 = (x_t - √(1-ᾱ_t) ε) / √ᾱ_t
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps_from_x0(self, x_t: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        # eq. 4 solved for ε: ε = (x_t - √ᾱ_t x_0) / √(1-ᾱ_t)
        sqrt_ab, sqrt_one_minus_ab = (
            extract(c, t, x_t) for c in (self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod)
        )
        return (x_t - sqrt_ab * x0) / sqrt_one_minus_ab

    def predict_x0_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        # Salimans & Ho 2022: x_0 = √ᾱ_t x_t - √(1-ᾱ_t) v (finite even where ᾱ_t = 0)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v
        )

    def predict_eps_from_v(self, x_t: torch.Tensor, t, v: torch.Tensor) -> torch.Tensor:
        # Salimans & Ho 2022: ε = √(1-ᾱ_t) x_t + √ᾱ_t v
        return (
            extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
            + extract(self.sqrt_alphas_cumprod, t, x_t) * v
        )

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """The v-prediction target v = √ᾱ_t ε - √(1-ᾱ_t) x_0 (diffusers' name and argument order)."""
        return (
            extract(self.sqrt_alphas_cumprod, timesteps, sample) * noise
            - extract(self.sqrt_one_minus_alphas_cumprod, timesteps, sample) * sample
        )

    def predict_x0(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """x̂_0 from the model output, read according to config.prediction_type."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return self.predict_x0_from_eps(x_t, t, model_output)
        if kind == "v_prediction":
            return self.predict_x0_from_v(x_t, t, model_output)
        if kind == "sample":
            return model_output
        raise ValueError(f"prediction_type={kind!r}; expected 'epsilon', 'v_prediction' or 'sample'")

    def _dynamic_threshold(self, x0: torch.Tensor) -> torch.Tensor:
        # Imagen (Saharia et al. 2022, sec. 2.3): s = a high percentile of |x̂_0| per sample; where
        # s > 1, clip to [-s, s] and divide by s, pulling saturated values inwards instead of
        # piling them up at ±1. s is capped at sample_max_value; s = 1 is plain clipping.
        work = x0 if x0.dtype in (torch.float32, torch.float64) else x0.float()  # quantile needs these
        s = torch.quantile(work.reshape(len(work), -1).abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(1.0, self.config.sample_max_value).reshape(-1, *[1] * (x0.ndim - 1))
        return (work.clamp(-s, s) / s).to(x0.dtype)

    # ---- reverse process -----------------------------------------------------------------------

    def p_mean_variance(self, model_output: torch.Tensor, x_t: torch.Tensor, t, respaced: bool = False):
        """Mean, variance σ_t², log variance and x̂_0 of p_θ(x_{t-1} | x_t).

        The mean is the posterior mean (eq. 7) at x̂_0; for an ε-model without clipping this is
        exactly eq. 11. Going through x̂_0 lets it be clipped (clip_sample) or thresholded first.
        σ_t² is fixed (sec. 3.2): β̃_t ("fixed_small", optimal for a single data point) or β_t
        ("fixed_large", optimal for x_0 ~ N(0, I)). The *_log variants name the same variances.
        """
        pred_x0 = self.predict_x0(model_output, x_t, t)
        if self.config.thresholding:
            pred_x0 = self._dynamic_threshold(pred_x0)
        elif self.config.clip_sample:
            pred_x0 = pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean, posterior_variance, posterior_log_variance = self.q_posterior(pred_x0, x_t, t, respaced)
        if self.config.variance_type.startswith("fixed_large"):
            # β_t of the step actually taken; improved-diffusion uses β̃_1 at t = 0 to tighten its
            # decoder, but diffusers keeps β_0 and agreeing with diffusers' step matters more here.
            beta = (self.step_posterior if respaced else self.posterior).beta
            variance = extract(beta, t, x_t)
            return mean, variance, variance.log(), pred_x0
        return mean, posterior_variance, posterior_log_variance, pred_x0

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> DDPMSchedulerOutput | tuple:
        """Algorithm 2, line 4: x_{t-1} = μ_θ(x_t, t) + σ_t z, for one (scalar) timestep."""
        t = timestep
        mean, variance, _, pred_x0 = self.p_mean_variance(model_output, sample, t, respaced=True)
        prev_sample = mean
        # z = 0 on the last step (Algorithm 2). Like diffusers we test t > 0, not prev_t >= 0: with
        # "leading" spacing and steps_offset=1 the last step is t=1 -> x_0, where fixed_small's
        # variance β̃ is 0 anyway but fixed_large still adds noise. Same call, same draws as diffusers.
        if t > 0:
            z = randn_tensor(
                model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
            )
            prev_sample = mean + variance.sqrt() * z
        if not return_dict:
            return prev_sample, pred_x0
        return DDPMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    # ---- inference timesteps -------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the timesteps the sampler visits (descending) and the posteriors between them.

        Spacings follow Lin et al. 2023, Table 2: "leading" (k·T//n + steps_offset), "trailing"
        (starts at T-1, so a zero-terminal-SNR model sees pure noise) and "linspace".
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            ts = np.asarray(timesteps, dtype=np.int64)
            if np.any(np.diff(ts) >= 0):
                raise ValueError("custom timesteps must be strictly descending")
            self.custom_timesteps = True
        else:
            n = num_inference_steps
            if not 1 <= n <= T:
                raise ValueError(f"num_inference_steps={n} must be in [1, num_train_timesteps={T}]")
            spacing = self.config.timestep_spacing
            if spacing == "leading":
                ts = np.arange(n)[::-1] * (T // n) + self.config.steps_offset
            elif spacing == "trailing":
                # np.arange's float accumulation, as diffusers does, so rounding ties fall alike; its
                # length can come out n + 1 (a step at t = -1), hence [:n].
                ts = np.round(np.arange(T, 0, -T / n))[:n] - 1
            elif spacing == "linspace":
                ts = np.round(np.linspace(0, T - 1, n))[::-1]
            else:
                raise ValueError(
                    f"timestep_spacing={spacing!r}; expected 'leading', 'trailing' or 'linspace'"
                )
            self.custom_timesteps = False
        ts = torch.from_numpy(np.ascontiguousarray(ts, dtype=np.int64))
        if ts[0] >= T or ts[-1] < 0:
            raise ValueError(f"timesteps must lie in [0, {T}), got {ts.tolist()}")
        self.num_inference_steps = len(ts)
        self.timesteps = ts.to(device)

        # The chain t_n > ... > t_1 -> x_0: each visited t steps to the next visited one (-1 = done).
        prev = torch.cat([ts[1:], torch.tensor([-1])])
        self.prev_timesteps = torch.arange(T) - 1  # timesteps off the chain keep the training chain
        self.prev_timesteps[ts] = prev
        ab = self.alphas_cumprod[ts].flip(0)  # gaussian_posterior wants increasing t
        ab_prev = torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], 1.0).flip(0)
        chain = gaussian_posterior(ab, ab_prev)
        tables = []
        for full, visited in zip(self.posterior, chain):
            full = full.clone()
            full[ts.flip(0)] = visited
            tables.append(full)
        self.step_posterior = GaussianPosterior(*tables)

    def previous_timestep(self, timestep):
        """The timestep step() goes to from `timestep`: the next visited one, or -1 after the last.

        A timestep off the chain set_timesteps chose goes to t - 1 (diffusers raises there).
        """
        prev = self.prev_timesteps[torch.as_tensor(timestep).cpu().long()]
        return prev.to(timestep.device) if isinstance(timestep, torch.Tensor) else int(prev)

    # ---- variational bound (eq. 5) -------------------------------------------------------------

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) per element, in nats. No parameters, so ~0 if T suffices."""
        t = torch.full((len(x0),), self.config.num_train_timesteps - 1)
        mean = extract(self.sqrt_alphas_cumprod, t, x0) * x0
        log_var = extract(torch.log(1 - self.alphas_cumprod), t, x0)
        return normal_kl(mean, log_var, torch.zeros_like(x0), torch.zeros_like(x0))

    def vb_term(
        self,
        model_output: torch.Tensor,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        bin_width: float | None = None,
    ) -> torch.Tensor:
        """The eq. 5 term of step t -> t-1 per element in nats; t: (B,) training timesteps.

        t > 0: L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p_θ(x_{t-1} | x_t)).
        t = 0: L_0 = -log p_θ(x_0 | x_1), the decoder. For continuous data (latents, bin_width=None)
        p_θ is the Gaussian N(μ_θ, σ²) of that last step, a density: the bound is then on a
        differential entropy, comparable between models of the same data but not to bits of pixels.
        For data quantized to bins of width bin_width on [-1, 1] (2/255 for 8-bit images) it is
        eq. 13's discrete decoder: the Gaussian's mass over x_0's bin, edge bins extended to ±∞.
        """
        true_mean, _, true_log_var = self.q_posterior(x0, x_t, t)
        mean, _, log_var, _ = self.p_mean_variance(model_output, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var)
        if bin_width is None:
            decoder_nll = -gaussian_log_likelihood(x0, mean, log_var)
        else:
            decoder_nll = -discretized_gaussian_log_likelihood(x0, mean, log_var, bin_width)
        is_decoder = (torch.as_tensor(t, device=x0.device) == 0).reshape(-1, *[1] * (x0.ndim - 1))
        return torch.where(is_decoder, decoder_nll, kl)

    @torch.no_grad()
    def calc_bpd_loop(
        self,
        model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        x0: torch.Tensor,
        stride: int = 1,
        offset: int | None = None,
        bin_width: float | None = None,
        generator: torch.Generator | None = None,
        dense_below: int = 1,
    ) -> VariationalBound:
        """The bound of eq. 5 per sample, in bits per dimension; model_fn(x_t, t) -> model output.

        Each term uses one draw of x_t ~ q(x_t | x_0), as improved-diffusion does, so the result is
        an unbiased single-sample estimate of the bound. The terms computed are ``bound_timesteps``'s:
        stride=1 sums all T; stride=k keeps L_T, the terms t < dense_below and, of the rest, every
        k-th from ``offset`` weighted by k. With offset drawn uniformly from 0..k-1 (offset=None,
        from ``generator``) each is kept with probability exactly 1/k: unbiased at 1/k of the calls.
        The same model calls give the ε-MSE (the training loss of an ε-model), weighted alike.
        """
        T, B = self.config.num_train_timesteps, len(x0)
        if offset is None:
            offset = int(torch.randint(stride, (1,), generator=generator))
        steps = bound_timesteps(T, stride, dense_below, offset)
        terms = torch.zeros(B, T, device=x0.device, dtype=x0.dtype)
        weights = torch.zeros(T, device=x0.device, dtype=x0.dtype)
        eps_mse = torch.zeros(B, device=x0.device, dtype=x0.dtype)
        for t_int, weight in steps:
            t = torch.full((B,), t_int, device=x0.device, dtype=torch.long)
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
            x_t = self.q_sample(x0, t, noise)
            output = model_fn(x_t, t)
            terms[:, t_int] = bits_per_dim(self.vb_term(output, x0, x_t, t, bin_width))
            weights[t_int] = weight
            eps_mse += weight * ((self.predict_eps(output, x_t, t) - noise) ** 2).reshape(B, -1).mean(1)
        prior = bits_per_dim(self.prior_kl(x0))
        total = prior + (terms * weights).sum(1)
        return VariationalBound(total, prior, terms, weights, eps_mse / weights.sum())

    def predict_eps(self, model_output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """ε̂ from the model output, read according to config.prediction_type."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return model_output
        if kind == "v_prediction":
            return self.predict_eps_from_v(x_t, t, model_output)
        return self.predict_eps_from_x0(x_t, t, self.predict_x0(model_output, x_t, t))


# Log likelihoods and KL of diagonal Gaussians, all per element, in nats.
def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in closed form."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1
    )


def gaussian_log_likelihood(x, mean, log_var) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + log_var + (x - mean) ** 2 * torch.exp(-log_var))


def discretized_gaussian_log_likelihood(x, mean, log_var, bin_width: float) -> torch.Tensor:
    """log ∫ N(y; mean, e^log_var) dy over x's bin [x - w/2, x + w/2] of data in [-1, 1] (eq. 13)."""
    inv_std = torch.exp(-0.5 * log_var)
    upper = inv_std * (x - mean + bin_width / 2)
    lower = inv_std * (x - mean - bin_width / 2)
    log_cdf_upper = torch.special.log_ndtr(upper)  # edge bin at -1 extends to -∞
    log_sf_lower = torch.special.log_ndtr(-lower)  # edge bin at +1 extends to +∞
    log_mass = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    return torch.where(
        x < -1 + bin_width / 2, log_cdf_upper, torch.where(x > 1 - bin_width / 2, log_sf_lower, log_mass)
    )


def bits_per_dim(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats -> bits per dimension per sample: mean over non-batch dims / ln 2."""
    return nats.reshape(len(nats), -1).mean(1) / math.log(2)
