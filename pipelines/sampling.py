"""The state of one sampling call, as diffusers' pipelines expose it, and guidance helpers.

A step-end callback ``f(pipe, i, t, tensors)`` sees the pipeline mid-call: ``pipe.guidance_scale``
(it may change ``pipe._guidance_scale``, which the next step reads), ``pipe.num_timesteps``, and
``pipe._interrupt`` (set it to stop after this step). The tensors it may read and replace are the
pipeline's ``_callback_tensor_inputs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch


class NonFiniteSampleError(FloatingPointError):
    """The latents stopped being finite during sampling; the message names the cause."""


@dataclass
class Start:
    """Where one call's reverse process starts, and what each of its steps adds.

    timesteps: the steps to run, in order (the whole schedule, or its last part for image to image);
    latents: the first x_t; step_inputs: per-image (N, ., h, w) tensors the steps read besides x_t,
    by name (inpainting's "mask" and "masked_image_latents"), which a step-end callback may read and
    replace; unet_reads: the names of those the U-Net takes as input channels after x_t's, in order
    (an inpainting U-Net's); after_step(i, x_{t-1}, step_inputs) -> x_{t-1}: run after step i
    (inpainting with an ordinary U-Net puts the known region back there).
    """

    timesteps: torch.Tensor
    latents: torch.Tensor
    step_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    unet_reads: tuple[str, ...] = ()
    after_step: Callable[[int, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor] | None = None


class SamplingState:
    """Properties of the call in progress, the callback hand-off and the finiteness check."""

    _guidance_scale = 7.5
    _guidance_rescale = 0.0
    _clip_skip = None
    _cross_attention_kwargs = None
    _num_timesteps = 0
    _interrupt = False
    _callback_added_cond: dict[str, str] = {}  # callback tensor name -> added_cond_kwargs key

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_rescale(self) -> float:
        return self._guidance_rescale

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Two U-Net passes per step: w > 1 and a U-Net not distilled to take w as an input."""
        return self._guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None

    def resolve_size(self, height: int | None, width: int | None) -> tuple[int | None, int | None]:
        """The U-Net's training size in pixels where height or width is None."""
        size = self.unet.config.sample_size
        rows, cols = (size, size) if isinstance(size, int) else size
        f = self.vae_scale_factor
        return (rows * f if height is None else height), (cols * f if width is None else width)

    def run_callback(self, callback, names, i, t, latents, context, added_cond=None, step_inputs=None):
        """Hand the named tensors to ``callback``; return (latents, context, added_cond, step_inputs)
        with its replacements.

        "prompt_embeds" is the U-Net's whole context ([negative; positive] when guided, as in
        diffusers), "negative_prompt_embeds" its unconditional half (None unguided). A pipeline whose
        U-Net takes added conditioning names its tensors in ``_callback_added_cond`` (callback name ->
        ``added_cond`` key; SDXL's "add_text_embeds" is ``added_cond["text_embeds"]``). The step's
        other inputs (``Start.step_inputs``, as ``denoise`` holds them) go by their own names.
        """
        step_inputs = step_inputs or {}
        guided = len(context) == 2 * len(latents)
        negative = context[: len(context) // 2] if guided else None
        named = {"latents": latents, "prompt_embeds": context, "negative_prompt_embeds": negative}
        named.update(step_inputs)
        named.update({name: added_cond[key] for name, key in self._callback_added_cond.items()})
        out = callback(self, i, t, {name: named[name] for name in names}) or {}
        latents, context = out.get("latents", latents), out.get("prompt_embeds", context)
        new_negative = out.get("negative_prompt_embeds", negative)
        if guided and new_negative is not negative and new_negative is not None:
            context = torch.cat([new_negative, context[len(context) // 2 :]])
        replaced = {key: out[name] for name, key in self._callback_added_cond.items() if name in out}
        step_inputs = {name: out.get(name, x) for name, x in step_inputs.items()}
        return latents, context, ({**added_cond, **replaced} if replaced else added_cond), step_inputs

    def check_finite(self, latents, i, t, before, unet_out, eps) -> None:
        """Raise NonFiniteSampleError naming the cause when a step's latents hold NaN or inf."""
        if torch.isfinite(latents).all():
            return
        w = self._guidance_scale
        where = f"at step {i} (t={int(t)})"
        if not torch.isfinite(before).all():
            cause = "the latents were already NaN or inf before this step (a callback's replacement?)"
        elif not torch.isfinite(unet_out).all():
            cause = (
                "the U-Net's noise prediction is NaN or inf: its weights or their dtype overflow "
                "(try torch.float32)"
            )
            if w > 50:
                cause += f", or guidance_scale={w:g}, far above the usual 1-20, blew up the latents"
        elif not torch.isfinite(eps).all():
            cause = (
                f"classifier-free guidance overflowed: guidance_scale={w:g} times the difference of the "
                "two noise predictions is not finite; use a guidance_scale of about 1-20"
            )
        else:
            cause = f"{type(self.scheduler).__name__}.step made them from finite inputs: check its config"
        raise NonFiniteSampleError(f"the latents became NaN or inf {where}: {cause}")

    def step_kwargs(self, generator, eta: float) -> dict:
        """The extra arguments this scheduler's step() takes: generator (DDPM, Euler...), eta (DDIM)."""
        accepts = _parameters(type(self.scheduler).step)
        kwargs = {}
        if "generator" in accepts:
            kwargs["generator"] = generator
        if "eta" in accepts:
            kwargs["eta"] = eta
        return kwargs

    def set_schedule(self, num_inference_steps, timesteps, sigmas, device) -> None:
        """The scheduler's timesteps: n evenly spaced, or a custom list of timesteps or sigmas."""
        custom = {"timesteps": timesteps} if timesteps is not None else {"sigmas": sigmas} if sigmas else {}
        for name in custom:
            if name not in _parameters(type(self.scheduler).set_timesteps):
                raise ValueError(
                    f"{name}= needs a scheduler whose set_timesteps takes {name}; "
                    f"{type(self.scheduler).__name__} does not (Euler and DPM++ take both)"
                )
        if custom:
            self.scheduler.set_timesteps(device=device, **custom)
        else:
            self.scheduler.set_timesteps(num_inference_steps, device=device)


def rescale_guidance(eps: torch.Tensor, eps_cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", eqs. 15-16:
    rescale the guided prediction to the conditional one's standard deviation, mixed by phi."""
    dims = list(range(1, eps.ndim))
    rescaled = eps * (eps_cond.std(dim=dims, keepdim=True) / eps.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * eps


def guidance_embedding(unet_config, guidance_scale: float, num_images: int, like: torch.Tensor):
    """timestep_cond for a guidance-distilled U-Net (time_cond_proj_dim set), else None.

    Sinusoidal features of (w - 1) * 1000 (Meng et al. 2023, "On Distillation of Guided
    Diffusion Models"), as diffusers computes them.
    """
    dim = unet_config.time_cond_proj_dim
    if dim is None:
        return None
    w = torch.full((num_images,), guidance_scale - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.nn.functional.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))
    return emb.to(device=like.device, dtype=like.dtype)


def in_interval(t, interval: tuple[float, float] | None) -> bool:
    """Whether timestep t lies in the guidance interval (lo, hi), ends included; None: always."""
    return interval is None or interval[0] <= float(t) <= interval[1]


def conditional_half(batch):
    """The conditional half of a guided batch (the unconditional half is first): of a tensor, or of
    each tensor of a dict (the added conditioning); None stays None."""
    if isinstance(batch, dict):
        return {k: conditional_half(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):  # IP-Adapter image embeddings: one tensor per adapter
        return type(batch)(conditional_half(v) for v in batch)
    return batch.chunk(2)[1] if isinstance(batch, torch.Tensor) else batch


@cache
def _parameters(function) -> frozenset[str]:
    return frozenset(inspect.signature(function).parameters)
