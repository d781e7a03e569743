"""The likelihood of held-out data under a text-to-image diffusion model, in bits per dimension.

The variational bound L_T + Σ_{t>1} L_{t-1} + L_0 of Ho et al. 2020 eq. 5 of each image's latents
given its caption, divided by D · ln 2, reported beside the plain ε-MSE training loss on the same
latents. The bound itself is the scheduler's (``DDPMScheduler.calc_bpd_loop``, its terms ``prior_kl``
and ``vb_term``): this module only encodes images and captions and averages over batches.

Latents are continuous, so this bounds a differential entropy: lower is better, it can go below zero,
and it compares models that share a VAE, not with the bits per pixel of image models.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from sdlite.conditioning_xl import add_time_ids, encode_prompts_xl
from sdlite.latents import encode
from sdlite.tokenizer import token_ids


@dataclass
class BoundReport:
    """The variational bound (eq. 5) of held-out latents, mean over them, in bits per dimension."""

    bpd: float  # L_T + Σ_{t>1} L_{t-1} + L_0, the mean of the draws
    prior: float  # L_T
    diffusion: float  # Σ_{t>1} L_{t-1}
    decoder: float  # L_0
    eps_mse: float  # the training loss ||ε - ε_θ(x_t, t, c)||², t ~ U{0..T-1}, on the same latents
    count: int  # latents measured
    stride: int  # 1: every term summed; k: every k-th term of the tail (random offset), times k
    draws: list[float] = field(default_factory=list)  # bits/dim of each independent draw of the terms

    @property
    def spread(self) -> float | None:
        """The standard error of ``bpd`` over the draws: the estimator's own spread on these latents
        (which terms were sampled, and the noise of each); None from a single draw."""
        if len(self.draws) < 2:
            return None
        return statistics.stdev(self.draws) / math.sqrt(len(self.draws))

    def line(self) -> str:
        if self.spread is None:
            estimate = f"bits/dim {self.bpd:.3f} (one draw of the sampled terms: no spread"
        else:
            estimate = (
                f"bits/dim {self.bpd:.3f} ± {self.spread:.3f} (standard error over {len(self.draws)} draws "
                f"of the sampled terms, {min(self.draws):.3f} to {max(self.draws):.3f}"
            )
        return (
            f"{estimate}; L_T {self.prior:.4f} + Σ L_t-1 {self.diffusion:.3f} + L_0 {self.decoder:.3f}; "
            f"stride {self.stride}, {self.count} latents); eps-MSE {self.eps_mse:.4f}"
        )


@torch.no_grad()
def encode_text(tokenizer, text_encoder, texts: Sequence[str]) -> torch.Tensor:
    """(N, tokens, width) CLIP embeddings of texts padded to the tokenizer's length."""
    return text_encoder(token_ids(tokenizer, texts).to(text_encoder.device))[0]


@torch.no_grad()
def condition(parts, captions: Sequence[str], size: tuple[int, int]) -> tuple[torch.Tensor, dict | None]:
    """The U-Net's conditioning of ``captions``: (context, added_cond_kwargs). SDXL parts (a second text
    encoder) add encoder 2's pooled embedding and the six size/crop numbers of an uncropped image of
    ``size`` (height, width) pixels, what training gave a square image."""
    if getattr(parts, "text_encoder_2", None) is None:
        return encode_text(parts.tokenizer, parts.text_encoder, captions), None
    context, pooled = encode_prompts_xl(
        parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2, captions
    )
    time_ids = add_time_ids(size, (0, 0), size, dtype=pooled.dtype).to(pooled.device)
    return context, {"text_embeds": pooled, "time_ids": time_ids.expand(len(captions), 6)}


@torch.no_grad()
def variational_bound(
    parts,
    images: torch.Tensor,
    captions: Sequence[str],
    stride: int = 10,
    dense_below: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    offset: int | None = None,
    draws: int = 1,
) -> BoundReport:
    """Bits per dimension of the images' latents given their captions, under the diffusion model.

    ``parts`` holds vae, tokenizer, text_encoder, unet and scheduler (a pipeline or
    ``sdlite.models.Components``; SDXL's also tokenizer_2 and text_encoder_2); ``images`` is (N, 3, H, W)
    in [-1, 1]. Latents are x_0 of ``sdlite.latents.encode`` (z ~ q(z|x), shifted and scaled as in
    training). The terms are those of ``sdlite.ddpm.bound_timesteps``: every t < dense_below, then every
    ``stride``-th t from an offset. Each of ``draws`` independent estimates takes its own offset (distinct
    ones while there are, drawn from ``seed``; or the one ``offset`` given) and its own noise, so their
    spread (``BoundReport.spread``) is the estimator's: one draw alone is no measurement of it.
    """
    if offset is not None and draws != 1:
        raise ValueError(f"offset={offset} fixes the terms of a single draw; got draws={draws}")
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    generator = torch.Generator().manual_seed(seed)
    if offset is None:  # each offset equally likely in every draw: each draw is unbiased on its own
        order = torch.randperm(stride, generator=generator).tolist()
        offsets = [order[i % stride] for i in range(draws)]
    else:
        offsets = [offset]
    terms = [
        _bound_terms(parts, images, captions, stride, dense_below, k, generator, batch_size) for k in offsets
    ]
    prior, diffusion, decoder, mse = (statistics.fmean(t[i] for t in terms) for i in range(4))
    return BoundReport(
        bpd=prior + diffusion + decoder,
        prior=prior,
        diffusion=diffusion,
        decoder=decoder,
        eps_mse=mse,
        count=len(images),
        stride=stride,
        draws=[t[0] + t[1] + t[2] for t in terms],
    )


def _bound_terms(parts, images, captions, stride, dense_below, offset, generator, batch_size):
    """(L_T, Σ L_t-1, L_0, ε-MSE), each the mean over the images, of one draw of the sampled terms."""
    scheduler, unet = parts.scheduler, parts.unet
    prior, decoder, diffusion, mse = ([] for _ in range(4))
    for start in range(0, len(images), batch_size):
        x0 = encode(parts.vae, images[start : start + batch_size], generator).float()
        context, added = condition(parts, captions[start : start + batch_size], tuple(images.shape[-2:]))

        def model_fn(x_t: torch.Tensor, t: torch.Tensor, context=context, added=added) -> torch.Tensor:
            x_t, t = x_t.to(unet.dtype), t.to(unet.device)
            return unet(x_t, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()

        bound = scheduler.calc_bpd_loop(
            model_fn, x0, stride=stride, offset=offset, generator=generator, dense_below=dense_below
        )
        prior.append(bound.prior_bpd)
        decoder.append(bound.terms_bpd[:, 0])
        diffusion.append(bound.diffusion_bpd)
        mse.append(bound.eps_mse)
    return tuple(torch.cat(v).mean().item() for v in (prior, diffusion, decoder, mse))
