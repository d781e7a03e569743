import math

import numpy as np
import pytest
import torch

from sdlite.data.shapes import PALETTE, ShapeSpec, draw, parse_pair, sample_specs
from sdlite.evaluation import (
    analyse_image,
    bound_timesteps,
    encode_images,
    encode_text,
    prompt_fidelity,
    variational_bound,
)

PROMPTS = ["a red circle", "a blue square", "a yellow triangle"]


def data_like(prompts, seed):
    """A perfect model: draws what each prompt asks, at a random size and place, as the data does."""
    images = []
    for i, prompt in enumerate(prompts):
        colour, shape = parse_pair(prompt)
        (spec,) = sample_specs(1, seed=[seed, i], colours=[colour], shapes=[shape])
        images.append(draw(spec) / 255.0)  # floats in [0, 1], as a pipeline's output_type="np"
    return images


def test_a_model_that_draws_the_data_scores_full_fidelity_and_diversity_near_one():
    report = prompt_fidelity(data_like, PROMPTS, n=24, seed=0)
    assert report.fidelity == 1.0
    assert 0.7 < report.diversity < 1.3
    assert "overall" in report.table()


def test_a_model_that_draws_one_picture_per_prompt_has_no_diversity():
    def same_every_time(prompts, seed):
        return [data_like([p], seed=0)[0] for p in prompts]

    report = prompt_fidelity(same_every_time, PROMPTS, n=4)
    assert report.fidelity == 1.0
    assert report.diversity == 0.0


def test_wrong_colour_right_shape_counts_as_wrong_and_unseen_pairs_are_reported_apart():
    def always_green(prompts, seed):
        return [draw(ShapeSpec("green", parse_pair(p)[1], 16, 16, 8, None)) for p in prompts]

    report = prompt_fidelity(always_green, PROMPTS, n=2, unseen=["red circle"])
    assert report.fidelity == 0.0
    assert all(s.shape == 1.0 and s.colour == 0.0 for s in report.scores)
    assert [s.seen for s in report.scores] == [False, True, True]
    assert "never seen" in report.table()


def test_analysis_reads_blurred_noisy_shapes_and_finds_nothing_in_a_blank_image():
    rng = np.random.default_rng(0)
    spec = ShapeSpec("magenta", "triangle", 14, 17, 9, None)
    image = draw(spec).astype(float)
    image = (image + np.roll(image, 1, axis=0) + np.roll(image, 1, axis=1)) / 3  # soften the edges
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    a = analyse_image(image)
    assert (a.colour, a.shape) == ("magenta", "triangle")
    assert abs(a.cx - 14) <= 1 and abs(a.cy - 17) <= 1 and abs(a.half - 9) <= 1
    blank = analyse_image(np.full((32, 32, 3), 250, np.uint8))
    assert blank.shape is None and blank.colour is None


def test_each_palette_colour_is_read_back():
    for colour in PALETTE:
        assert analyse_image(draw(ShapeSpec(colour, "square", 16, 16, 6, None))).colour == colour


def tiny_parts(num_train_timesteps=1000):
    """Random tiny parts; a shorter chain keeps a full (every-term) bound cheap."""
    from sdlite.ddpm import DDPMScheduler
    from sdlite.models import build_components

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


def test_every_term_summed_equals_the_schedulers_own_bound():
    parts, (images, captions) = tiny_parts(num_train_timesteps=40), held_out()
    ours = variational_bound(parts, images, captions, stride=1, offset=0, seed=0)
    generator = torch.Generator().manual_seed(0)  # the same draws, in the same order
    x0 = encode_images(parts.vae, images, generator)
    context = encode_text(parts.tokenizer, parts.text_encoder, captions)
    theirs = parts.scheduler.calc_bpd_loop(
        lambda x_t, t: parts.unet(x_t, t, encoder_hidden_states=context).sample,
        x0,
        stride=1,
        offset=0,
        generator=generator,
    )
    assert ours.bpd == pytest.approx(theirs.total_bpd.mean().item(), rel=1e-5)
    assert ours.decoder == pytest.approx(theirs.terms_bpd[:, 0].mean().item(), rel=1e-5)


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
