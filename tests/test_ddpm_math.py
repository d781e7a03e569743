"""The equations of Ho et al. 2020 checked numerically against sdlite.ddpm, not restated.

Each test computes the paper's quantity a second, independent way (Monte Carlo, a dense grid,
Bayes' rule, a closed form for Gaussian data) and compares.
"""

import math

import numpy as np
import pytest
import torch

from sdlite.ddpm import (
    DDPMScheduler,
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    normal_kl,
)

T = 1000


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_eq4_closed_form_equals_iterating_the_one_step_forward_process(beta_schedule):
    # Iterate eq. 2, x_t = √(1-β_t) x_{t-1} + √β_t z, on 200k copies of one x_0 and compare the
    # empirical mean and variance of x_t with eq. 4's √ᾱ_t x_0 and 1 - ᾱ_t.
    sched = DDPMScheduler(beta_schedule=beta_schedule)
    g, n, x0 = gen(), 200_000, 0.7
    x = torch.full((n,), x0)  # float32 is plenty for 0.3% and twice as fast as float64
    checkpoints = {0, 1, 2, 10, 100, 500, 999}
    for t in range(T):
        beta = sched.betas[t].float()
        x = (1 - beta).sqrt() * x + beta.sqrt() * torch.randn(n, generator=g)
        if t in checkpoints:
            x64 = x.double()
            mean = sched.q_sample(
                torch.tensor([x0], dtype=torch.float64), t, torch.zeros(1, dtype=torch.float64)
            )
            var = 1 - sched.alphas_cumprod[t]
            # Sampling errors: mean ± 5 standard errors; variance relative error ~ √(2/n) = 0.3%.
            assert abs(x64.mean() - mean.item()) < 5 * math.sqrt(var / n), t
            assert abs(x64.var() / var - 1) < 5 * math.sqrt(2 / n), t
            # q_sample's noise scale is the same √(1 - ᾱ_t) (checked at unit noise, zero x_0).
            one = torch.ones(1, dtype=torch.float64)
            assert sched.q_sample(0 * one, t, one).item() == pytest.approx(var.sqrt().item(), rel=1e-12)


def _bayes_posterior_on_grid(x0, x_t, jump_mean_coef, jump_var, prior_mean, prior_var):
    """Mean and variance of p(x_prev | x_t, x_0) ∝ q(x_t | x_prev) q(x_prev | x_0) on a dense grid."""
    grid = torch.linspace(-6, 6, 1_200_001, dtype=torch.float64)
    log_p = -0.5 * (x_t - jump_mean_coef * grid) ** 2 / jump_var - 0.5 * (grid - prior_mean) ** 2 / prior_var
    w = torch.softmax(log_p, 0)  # normalising the product of the two Gaussians
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum()


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_eq7_posterior_is_bayes_rule_on_a_grid(t):
    sched = DDPMScheduler()
    x0, x_t = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-0.4, dtype=torch.float64)
    beta, ab_prev = sched.betas[t], sched.alphas_cumprod[t - 1]
    # eq. 2: q(x_t | x_{t-1}) = N(√(1-β_t) x_{t-1}, β_t); eq. 4: q(x_{t-1} | x_0) = N(√ᾱ_{t-1} x_0, 1-ᾱ_{t-1})
    want_mean, want_var = _bayes_posterior_on_grid(
        x0, x_t, (1 - beta).sqrt(), beta, ab_prev.sqrt() * x0, 1 - ab_prev
    )
    mean, var, log_var = sched.q_posterior(x0, x_t, t)
    assert mean.item() == pytest.approx(want_mean.item(), abs=1e-7)
    assert var.item() == pytest.approx(want_var.item(), rel=1e-5)
    assert log_var.exp().item() == pytest.approx(var.item(), rel=1e-12)  # clipping only touches t = 0


def test_respaced_posterior_is_bayes_rule_between_the_visited_timesteps():
    # After set_timesteps(10) step() jumps t = 900 -> 800. Iterating eq. 2 over the skipped steps
    # gives q(x_900 | x_800) = N(√(Π α_s) x_800, 1 - Π α_s); the posterior must be that jump's.
    sched = DDPMScheduler()
    sched.set_timesteps(10)
    t, prev = 900, sched.previous_timestep(900)
    assert prev == 800
    prod_alpha = torch.prod(sched.alphas[prev + 1 : t + 1])
    ab_prev = sched.alphas_cumprod[prev]
    x0, x_t = torch.tensor(-0.8, dtype=torch.float64), torch.tensor(1.1, dtype=torch.float64)
    want_mean, want_var = _bayes_posterior_on_grid(
        x0, x_t, prod_alpha.sqrt(), 1 - prod_alpha, ab_prev.sqrt() * x0, 1 - ab_prev
    )
    mean, var, _ = sched.q_posterior(x0, x_t, t, respaced=True)
    assert mean.item() == pytest.approx(want_mean.item(), abs=1e-7)
    assert var.item() == pytest.approx(want_var.item(), rel=1e-5)
    # ... and it is not the training chain's posterior for 900 -> 899.
    assert sched.q_posterior(x0, x_t, t)[1].item() < 0.1 * var.item()


def test_eq11_with_the_true_noise_gives_the_eq7_posterior_mean():
    sched = DDPMScheduler(clip_sample=False)
    g = gen(1)
    x0 = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 5, 50, 300, 700, 998, 999])
    x_t = sched.q_sample(x0, t, eps)
    b = sched.betas[t].reshape(-1, 1, 1, 1)
    ab = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    eq11 = (x_t - b / (1 - ab).sqrt() * eps) / (1 - b).sqrt()  # eq. 11 written from the paper
    posterior_mean, _, _ = sched.q_posterior(x0, x_t, t)
    model_mean, _, _, pred_x0 = sched.p_mean_variance(eps, x_t, t)
    torch.testing.assert_close(posterior_mean, eq11, rtol=0, atol=1e-10)
    torch.testing.assert_close(model_mean, eq11, rtol=0, atol=1e-10)
    torch.testing.assert_close(pred_x0, x0, rtol=0, atol=1e-9)  # eq. 15 inverts eq. 4


def test_eps_x0_v_conversions_invert_each_other_at_every_t():
    sched = DDPMScheduler()
    g = gen(2)
    t = torch.arange(T)
    x0 = torch.randn(T, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(T, 4, generator=g, dtype=torch.float64)
    x_t = sched.q_sample(x0, t, eps)
    v = sched.get_velocity(x0, eps, t)
    ab = sched.alphas_cumprod[:, None]
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)  # Salimans & Ho's definition
    torch.testing.assert_close(sched.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.predict_eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-9)
    torch.testing.assert_close(sched.predict_x0_from_v(x_t, t, v), x0, rtol=0, atol=1e-12)
    torch.testing.assert_close(sched.predict_eps_from_v(x_t, t, v), eps, rtol=0, atol=1e-12)


def test_normal_kl_matches_a_monte_carlo_estimate():
    g = gen(3)
    m1, lv1, m2, lv2 = (
        torch.tensor(v, dtype=torch.float64) for v in (0.3, math.log(0.5), -0.2, math.log(2.0))
    )
    x = m1 + (0.5 * lv1).exp() * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    log_ratio = gaussian_log_likelihood(x, m1, lv1) - gaussian_log_likelihood(x, m2, lv2)
    stderr = log_ratio.std() / math.sqrt(len(x))
    assert abs(log_ratio.mean() - normal_kl(m1, lv1, m2, lv2)) < 5 * stderr
    assert normal_kl(m1, lv1, m1, lv1) == 0


def test_kl_terms_vanish_for_a_perfect_eps_model_and_follow_eq8_otherwise():
    sched = DDPMScheduler(clip_sample=False)
    g = gen(4)
    x0 = torch.rand(6, 3, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(6, 3, 8, 8, generator=g)
    t = torch.tensor([1, 2, 10, 250, 700, 999])
    x_t = sched.q_sample(x0, t, eps)
    assert sched.vb_term(eps, x0, x_t, t).abs().max() < 1e-6  # ε_θ = ε: p_θ = q, L_{t-1} = 0
    # Off by δ in ε, eq. 11 moves the mean by β_t/(√α_t √(1-ᾱ_t)) δ; equal variances leave
    # KL = Δμ²/(2σ²) (eq. 8 without the constant).
    delta = 0.1
    kl = sched.vb_term(eps + delta, x0, x_t, t)
    b, ab = sched.betas[t], sched.alphas_cumprod[t]
    want = (b / ((1 - b).sqrt() * (1 - ab).sqrt()) * delta) ** 2 / (2 * sched.posterior.variance[t])
    torch.testing.assert_close(kl.mean((1, 2, 3)).double(), want, rtol=1e-3, atol=0)


def test_prior_term_is_negligible_for_the_linear_schedule_but_not_a_short_chain():
    x0 = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(4, 1, 4, 4)
    assert bits_per_dim(DDPMScheduler().prior_kl(x0)).max() < 1e-4
    short = DDPMScheduler(num_train_timesteps=10)
    assert bits_per_dim(short.prior_kl(x0)).min() > 0.1
    # L_T is the KL from q(x_T | x_0) = N(√ᾱ_T x_0, 1 - ᾱ_T), the chain's last ᾱ, to N(0, 1).
    ab = short.alphas_cumprod[-1]
    want = 0.5 * (ab * x0**2 + (1 - ab) - 1 - torch.log(1 - ab))
    torch.testing.assert_close(short.prior_kl(x0), want)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_decoder_term_of_a_perfect_model_is_its_peak_likelihood(variance_type):
    # At t = 0 a model that predicts x_0 exactly puts the decoder's mean on x_0, so L_0 is set by
    # the t = 0 variance alone: β_0 (fixed_large) or, since β̃_0 = 0, the clipped β̃_1 (fixed_small).
    sched = DDPMScheduler(variance_type=variance_type, prediction_type="sample", clip_sample=False)
    var = sched.betas[0] if variance_type == "fixed_large" else sched.posterior.variance[1]
    x0 = (torch.randint(0, 256, (2, 3, 4, 4), generator=gen(8)) / 127.5 - 1).double()
    t = torch.zeros(2, dtype=torch.long)
    x_1 = sched.q_sample(x0, t, torch.randn(x0.shape, generator=gen(9), dtype=torch.float64))
    continuous = sched.vb_term(x0, x0, x_1, t)
    torch.testing.assert_close(continuous, torch.full_like(x0, 0.5 * math.log(2 * math.pi * var)))
    pixels = sched.vb_term(x0, x0, x_1, t, bin_width=2 / 255)
    half_bin = 1 / 255 / var.sqrt()
    inner = -torch.log(torch.special.ndtr(half_bin) - torch.special.ndtr(-half_bin))  # mass of ±1/255
    edge = -torch.log(torch.special.ndtr(half_bin))  # the bins at ±1 reach to ±∞
    at_edge = x0.abs() > 1 - 1e-6
    torch.testing.assert_close(pixels, torch.where(at_edge, edge, inner).to(pixels.dtype))


def _gaussian_data_x0_model(sched, data_std=1.0):
    """Bayes-optimal x̂_0 = E[x_0 | x_t] for x_0 ~ N(0, data_std²) (prediction_type="sample")."""

    def model(x_t, t):
        ab = sched.alphas_cumprod[t].reshape(-1, *[1] * (x_t.ndim - 1)).to(x_t.dtype)
        return ab.sqrt() * data_std**2 / (ab * data_std**2 + 1 - ab) * x_t

    return model


def test_bound_is_tight_for_unit_gaussian_data_with_the_optimal_model_and_fixed_large():
    # Sec. 3.2: σ_t² = β_t is the optimal reverse variance for x_0 ~ N(0, I). Then with the
    # Bayes-optimal mean p_θ(x_{0:T}) = q(x_{0:T}) and eq. 5 is an equality in expectation:
    # E[bound | x_0] = -log N(x_0; 0, 1). With β̃_t ("fixed_small") it must be strictly looser.
    g = gen(5)
    x0 = torch.randn(10_000, 1, generator=g, dtype=torch.float64)
    nll_bits = -gaussian_log_likelihood(x0, 0.0, torch.zeros_like(x0))[:, 0] / math.log(2)
    gaps = {}
    for variance_type in ("fixed_large", "fixed_small"):
        sched = DDPMScheduler(variance_type=variance_type, prediction_type="sample", clip_sample=False)
        bound = sched.calc_bpd_loop(_gaussian_data_x0_model(sched), x0, generator=g)
        gap = bound.total_bpd - nll_bits
        gaps[variance_type] = (gap.mean().item(), gap.std().item() / math.sqrt(len(gap)))
    mean, stderr = gaps["fixed_large"]
    assert abs(mean) < 4 * stderr + 1e-4, gaps
    assert gaps["fixed_small"][0] > gaps["fixed_large"][0] + 10 * gaps["fixed_small"][1], gaps


def test_strided_bound_over_all_offsets_averages_to_the_full_bound():
    # A model that always predicts x̂_0 = 0 makes every term a deterministic function of x_0 (the
    # posterior means differ by coef_x0·x_0 whatever x_t is), so the estimator can be checked
    # exactly: averaging stride k over its k offsets must reproduce stride 1. k = 7 does not
    # divide T - 1 = 999, the case where a naive "every k-th t" estimate would be biased.
    sched = DDPMScheduler(prediction_type="sample", clip_sample=False)
    x0 = torch.rand(3, 2, 4, 4, generator=gen(6), dtype=torch.float64) * 2 - 1
    model = lambda x_t, t: torch.zeros_like(x_t)
    full = sched.calc_bpd_loop(model, x0, generator=gen(7)).total_bpd
    k = 7
    strided = [
        sched.calc_bpd_loop(model, x0, stride=k, offset=r, generator=gen(r)).total_bpd for r in range(k)
    ]
    torch.testing.assert_close(torch.stack(strided).mean(0), full, rtol=1e-10, atol=0)
    assert (torch.stack(strided) - full).abs().max() > 1e-3  # a single offset really is an estimate
    # The first terms all computed (weight 1), the tail sampled: still exact over the offsets.
    dense = [
        sched.calc_bpd_loop(model, x0, stride=k, offset=r, dense_below=50, generator=gen(r)) for r in range(k)
    ]
    torch.testing.assert_close(torch.stack([b.total_bpd for b in dense]).mean(0), full, rtol=1e-10, atol=0)
    assert dense[0].weights[:50].tolist() == [1] * 50 and set(dense[0].weights[50:].tolist()) == {0, k}


def test_an_oracle_that_knows_x0_pays_only_the_prior_and_the_decoder():
    # ε-model that returns the very noise of x_t (it knows x_0): ε-MSE is 0, x̂_0 = x_0 so p_θ's
    # mean is q's posterior mean and, with σ_t² = β̃_t, every L_{t-1} (t > 1) is KL(q || q) = 0.
    sched = DDPMScheduler(clip_sample=False, num_train_timesteps=100)
    x0 = torch.rand(4, 2, 3, 3, generator=gen(8), dtype=torch.float64) * 2 - 1

    def oracle(x_t, t):
        return sched.predict_eps_from_x0(x_t, t, x0)

    bound = sched.calc_bpd_loop(oracle, x0, stride=3, dense_below=10, generator=gen(9))
    assert bound.eps_mse.abs().max() < 1e-12
    assert bound.diffusion_bpd.abs().max() < 1e-9
    expected = bound.prior_bpd + bound.terms_bpd[:, 0]
    torch.testing.assert_close(bound.total_bpd, expected, rtol=1e-12, atol=1e-12)
    assert (bound.terms_bpd[:, 0] != 0).all()  # L_0: a density of x_0 under N(x_0, β̃_1), not 0


def test_discrete_decoder_puts_all_mass_on_the_256_pixel_values():
    # Eq. 13: bins of width 2/255 around each 8-bit level, the two edge bins extended to ±∞, so
    # the probabilities of the 256 values sum to one for any mean and variance.
    levels = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, std in [(0.0, 0.01), (0.9, 0.3), (-1.2, 0.05), (0.5, 3.0)]:
        log_p = discretized_gaussian_log_likelihood(
            levels, torch.tensor(mean, dtype=torch.float64), torch.tensor(2 * math.log(std)), 2 / 255
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6), (mean, std)


@pytest.mark.parametrize(
    ("spacing", "offset", "n", "expected"),
    [
        ("leading", 0, 10, [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]),
        ("leading", 1, 10, [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]),
        ("leading", 1, 3, [667, 334, 1]),
        ("trailing", 0, 10, [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]),
        ("trailing", 0, 3, [999, 666, 332]),
        ("linspace", 0, 10, [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]),
        ("linspace", 0, 4, [999, 666, 333, 0]),
    ],
)
def test_set_timesteps_spacings_give_the_expected_timesteps(spacing, offset, n, expected):
    sched = DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sched.set_timesteps(n)
    assert sched.timesteps.dtype == torch.long
    assert sched.timesteps.tolist() == expected
    assert [sched.previous_timestep(t) for t in expected] == expected[1:] + [-1]


def test_custom_timesteps_and_their_validation():
    sched = DDPMScheduler()
    sched.set_timesteps(timesteps=[999, 500, 20, 3])
    assert sched.timesteps.tolist() == [999, 500, 20, 3]
    assert sched.previous_timestep(torch.tensor(20)).item() == 3
    with pytest.raises(ValueError):
        sched.set_timesteps(timesteps=[500, 999])
    with pytest.raises(ValueError):
        sched.set_timesteps(timesteps=[1000, 3])
    with pytest.raises(ValueError):
        sched.set_timesteps(1001)


def test_beta_schedules_follow_their_definitions():
    lin = DDPMScheduler()
    assert lin.betas[0] == pytest.approx(1e-4) and lin.betas[-1] == pytest.approx(0.02)
    sl = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert torch.allclose(
        torch.diff(sl.betas.sqrt()),
        torch.full((T - 1,), (0.012**0.5 - 0.00085**0.5) / (T - 1), dtype=torch.float64),
    )
    cos = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # Nichol & Dhariwal eq. 17
    for t in (0, 10, 500, 900):
        assert cos.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert cos.betas.max().item() == pytest.approx(0.999)  # the cap bites at the end
    trained = DDPMScheduler(trained_betas=np.linspace(1e-3, 0.05, T).tolist())
    assert trained.betas[-1].item() == pytest.approx(0.05)


def test_zero_terminal_snr_rescaling():
    plain = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    zsnr = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True
    )
    assert zsnr.alphas_cumprod[-1] == 0 and zsnr.snr(T - 1) == 0  # Lin et al.: x_T is pure noise
    assert zsnr.alphas_cumprod[0].item() == pytest.approx(plain.alphas_cumprod[0].item(), rel=1e-12)
    # √ᾱ is an affine map of the original √ᾱ (Alg. 1), so the ratio of differences is constant.
    ratio = torch.diff(zsnr.alphas_cumprod.sqrt()) / torch.diff(plain.alphas_cumprod.sqrt())
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-9)
    assert plain.snr(T - 1) > 0


def test_snr_is_alphas_cumprod_over_its_complement_and_decreasing():
    sched = DDPMScheduler()
    t = torch.tensor([0, 10, 999])
    snr = sched.snr(t)
    assert snr.dtype == torch.float32
    ab = sched.alphas_cumprod[t]
    torch.testing.assert_close(snr, (ab / (1 - ab)).float())
    assert (torch.diff(sched.snr(torch.arange(T))) < 0).all()


def test_dynamic_thresholding_rescales_only_samples_beyond_the_range():
    sched = DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=5.0)
    inside = torch.linspace(-0.5, 0.5, 100)
    outside = torch.linspace(-3, 3, 100)  # 90th percentile of |x| = 2.7
    out = sched._dynamic_threshold(torch.stack([inside, outside]).reshape(2, 1, 10, 10)).reshape(2, 100)
    torch.testing.assert_close(out[0], inside)  # s clamps to 1: plain clipping, nothing to clip
    s = torch.quantile(outside.abs(), 0.9)
    torch.testing.assert_close(out[1], outside.clamp(-s, s) / s)
    assert out[1].abs().max() == pytest.approx(1.0)
