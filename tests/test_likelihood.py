"""Bits per dimension of held-out latents (sdlite.likelihood) over the scheduler's one bound loop."""

import math

import numpy as np
import pytest
import torch

from sdlite.data.shapes import draw, sample_specs
from sdlite.ddpm import DDPMScheduler, bound_timesteps
from sdlite.latents import encode
from sdlite.likelihood import encode_text, variational_bound
from sdlite.models import build_components


def tiny_parts(num_train_timesteps=1000):
    """Random tiny parts; a shorter chain keeps a full (every-term) bound cheap."""
    parts = build_components("tiny", seed=0)
    if num_train_timesteps != 1000:
        scale = 1000 / num_train_timesteps  # the same noise levels over fewer, larger steps
        parts.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_start=1e-4 * scale,
            beta_end=0.02 * scale,
            clip_sample=False,
        )
    return parts


def held_out(count=6):
    specs = sample_specs(count, seed=5)
    images = torch.from_numpy(np.stack([draw(s) for s in specs])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return images, [s.caption for s in specs]


def test_bits_per_dim_of_a_model_is_finite_positive_and_the_sum_of_its_terms():
    images, captions = held_out()
    bound = variational_bound(tiny_parts(), images, captions, stride=100, seed=0)
    assert math.isfinite(bound.bpd) and bound.bpd > 0
    assert bound.bpd == pytest.approx(bound.prior + bound.diffusion + bound.decoder)
    assert 0 <= bound.prior < 0.01  # L_T: q(x_T | x_0) is nearly N(0, I) after 1000 linear steps
    assert math.isfinite(bound.eps_mse) and bound.eps_mse > 0
    assert "bits/dim" in bound.line()


def test_the_bound_is_of_the_shifted_and_scaled_latents_the_model_trains_on():
    # A VAE with a shift_factor: the latents measured must be sdlite.latents.encode's
    # scaling_factor * (z - shift), as in training, not z * scaling_factor.
    parts, (images, captions) = tiny_parts(num_train_timesteps=40), held_out()
    parts.vae.register_to_config(shift_factor=0.5)
    ours = variational_bound(parts, images, captions, stride=1, offset=0, seed=0)

    def bound_of(x0, generator):
        context = encode_text(parts.tokenizer, parts.text_encoder, captions)
        model = lambda x_t, t: parts.unet(x_t, t, encoder_hidden_states=context).sample  # noqa: E731
        return parts.scheduler.calc_bpd_loop(model, x0, stride=1, offset=0, generator=generator)

    generator = torch.Generator().manual_seed(0)  # the same draws, in the same order
    shifted = bound_of(encode(parts.vae, images, generator), generator)
    assert ours.bpd == pytest.approx(shifted.total_bpd.mean().item(), rel=1e-5)
    assert ours.decoder == pytest.approx(shifted.terms_bpd[:, 0].mean().item(), rel=1e-5)
    generator = torch.Generator().manual_seed(0)
    z = parts.vae.encode(images).latent_dist.sample(generator)
    unshifted = bound_of(z * parts.vae.config.scaling_factor, generator)
    assert abs(ours.bpd - unshifted.total_bpd.mean().item()) > 1e-3


def test_the_sampled_tail_of_the_bound_estimates_the_full_sum():
    parts, (images, captions) = tiny_parts(num_train_timesteps=40), held_out()
    full = variational_bound(parts, images, captions, stride=1, offset=0)
    # Every 4th tail term times 4, from each of the 4 offsets: on average, every term once.
    strided = [
        variational_bound(parts, images, captions, stride=4, dense_below=8, offset=k) for k in range(4)
    ]
    assert np.mean([b.diffusion for b in strided]) == pytest.approx(full.diffusion, rel=0.05)
    assert np.mean([b.eps_mse for b in strided]) == pytest.approx(full.eps_mse, rel=0.1)
    assert bound_timesteps(10, stride=3, dense_below=4, offset=1) == [
        (0, 1),
        (1, 1),
        (2, 1),
        (3, 1),
        (5, 3),
        (8, 3),
    ]


def test_several_draws_of_the_sampled_terms_report_their_mean_and_spread():
    images, captions = held_out()
    bound = variational_bound(tiny_parts(), images, captions, stride=100, seed=0, draws=3)
    assert len(bound.draws) == 3 and len(set(bound.draws)) == 3  # distinct offsets and noise
    assert bound.bpd == pytest.approx(np.mean(bound.draws))
    assert bound.spread == pytest.approx(np.std(bound.draws, ddof=1) / math.sqrt(3))
    assert bound.spread > 0 and "±" in bound.line() and "3 draws" in bound.line()
    single = variational_bound(tiny_parts(), images, captions, stride=100, seed=0)
    assert single.spread is None and "no spread" in single.line()


def test_a_fixed_offset_is_one_draw_and_draws_must_be_positive():
    images, captions = held_out(2)
    with pytest.raises(ValueError, match="single draw"):
        variational_bound(tiny_parts(), images, captions, stride=10, offset=3, draws=2)
    with pytest.raises(ValueError, match="draws=0"):
        variational_bound(tiny_parts(), images, captions, stride=10, draws=0)
