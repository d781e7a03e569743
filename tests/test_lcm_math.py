"""sdlite/lcm.py: the pieces of latent consistency distillation against their closed forms and against
diffusers' LCMScheduler, which samples what they train."""

import pytest
import torch
from diffusers import LCMScheduler

from sdlite.ddpm import DDPMScheduler
from sdlite.lcm import (
    SkippingSchedule,
    boundary_scalings,
    consistency_function,
    ddim_step,
    guided,
    heun_step,
    pseudo_huber,
    x0_and_eps,
)

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def schedule(steps: int = 50) -> SkippingSchedule:
    return SkippingSchedule.of(DDPMScheduler(**SD_SCHEDULE).alphas_cumprod, steps)


def test_the_consistency_function_is_the_identity_at_t_0_its_boundary_condition():
    c_skip, c_out = boundary_scalings(torch.tensor([0]))
    assert c_skip.item() == 1 and c_out.item() == 0
    z, x0 = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(consistency_function(z, x0, torch.tensor([0])), z)


def test_away_from_t_0_the_consistency_function_is_almost_the_predicted_x0():
    z, x0 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    f = consistency_function(z, x0, torch.tensor([19, 999]))
    assert torch.allclose(f, x0, atol=1e-3)  # c_skip(19) = 0.25 / (190² + 0.25) ≈ 7e-6


def test_boundary_scalings_are_those_lcm_scheduler_samples_with():
    scheduler = LCMScheduler(**SD_SCHEDULE)
    t = torch.tensor([0, 1, 19, 259, 999])
    ours = boundary_scalings(t)
    for i, step in enumerate(t.tolist()):
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(step)
        assert ours[0][i].item() == pytest.approx(theirs[0], rel=1e-12)
        assert ours[1][i].item() == pytest.approx(theirs[1], rel=1e-12)


def test_the_skipping_schedule_is_the_grid_lcm_scheduler_samples_on():
    grid = schedule(50)
    assert grid.skip == 20 and grid.timesteps[0] == 19 and grid.timesteps[-1] == 999
    scheduler = LCMScheduler(**SD_SCHEDULE, original_inference_steps=50)
    for steps in (1, 2, 4, 8):
        scheduler.set_timesteps(steps)
        assert set(scheduler.timesteps.tolist()) <= set(grid.timesteps.tolist()), steps


def test_each_draw_is_one_solver_step_k_apart_and_the_first_ends_at_t_0():
    start, end = schedule(50).endpoints(torch.tensor([0, 1, 49]))
    assert start.tolist() == [19, 39, 999] and end.tolist() == [0, 19, 979]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_a_ddim_step_of_the_exact_predictor_of_a_point_mass_lands_on_its_ode_solution(prediction_type):
    # Data one point z_0: the exact ε of z_t = α z_0 + σ ε is (z_t - α z_0) / σ, and the PF-ODE's solution
    # from z_t through t_n is α(t_n) z_0 + σ(t_n) ε: one DDIM step must land there, for any step size.
    grid = schedule(50)
    z0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    eps = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    start, end = grid.endpoints(torch.tensor([0, 20, 49]))
    a, s = grid.alpha_sigma(start)
    a_end, s_end = grid.alpha_sigma(end)
    view = (-1, 1, 1, 1)
    z_t = a.view(view) * z0 + s.view(view) * eps
    output = eps if prediction_type == "epsilon" else a.view(view) * eps - s.view(view) * z0  # v
    x0_hat, eps_hat = x0_and_eps(output, z_t, a, s, prediction_type)
    assert torch.allclose(x0_hat, z0, atol=1e-10) and torch.allclose(eps_hat, eps, atol=1e-10)
    exact = a_end.view(view) * z0 + s_end.view(view) * eps
    assert torch.allclose(ddim_step(x0_hat, eps_hat, a_end, s_end), exact, atol=1e-10)


def test_heun_step_is_nearer_the_ode_solution_than_ddim_on_gaussian_data_and_exact_on_a_point():
    # Data N(0, s² I): the exact ε at z_t is σ z_t / (α² s² + σ²) and the PF-ODE keeps z_t / √(α² s² + σ²)
    # fixed, so the solution at t_n is known; each solver step's error is measured against it.
    grid, s2 = schedule(10), 0.25
    start, end = grid.endpoints(torch.tensor([2, 5, 9]))
    a, s = grid.alpha_sigma(start)
    a_end, s_end = grid.alpha_sigma(end)
    view = (-1, 1, 1, 1)

    def exact_eps(z, alpha, sigma):
        return (sigma / (alpha**2 * s2 + sigma**2)).view(view) * z

    z = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    exact = z * ((a_end**2 * s2 + s_end**2) / (a**2 * s2 + s**2)).sqrt().view(view)
    x0, eps = x0_and_eps(exact_eps(z, a, s), z, a, s, "epsilon")
    euler = ddim_step(x0, eps, a_end, s_end)
    heun = heun_step(z, eps, exact_eps(euler, a_end, s_end), a, s, a_end, s_end)
    ddim_error, heun_error = ((x - exact).abs().flatten(1).max(1).values for x in (euler, heun))
    assert (heun_error < 0.8 * ddim_error).all() and ddim_error.min() > 1e-4, (ddim_error, heun_error)
    # A point mass: ε is constant along the trajectory, so both steps are exact.
    z0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    point = a.view(view) * z0 + s.view(view) * torch.randn_like(z0)
    x0, eps = x0_and_eps((point - a.view(view) * z0) / s.view(view), point, a, s, "epsilon")
    landed = ddim_step(x0, eps, a_end, s_end)
    assert torch.allclose(heun_step(point, eps, eps, a, s, a_end, s_end), landed, atol=1e-10)


def test_guidance_is_the_papers_one_plus_omega_form_per_example():
    cond, uncond = torch.full((2, 1, 1, 1), 3.0), torch.full((2, 1, 1, 1), 1.0)
    out = guided(cond, uncond, torch.tensor([0.0, 2.0]))
    assert out.flatten().tolist() == [3.0, 7.0]  # ω = 0: the conditional alone; (1 + 2) 3 - 2 · 1 = 7


def test_pseudo_huber_is_zero_at_equality_quadratic_below_c_and_linear_above():
    x = torch.zeros(2, 1, 2, 2)
    assert pseudo_huber(x, x, 0.1).tolist() == [0.0, 0.0]
    y = torch.tensor([0.1, 1e-3, 10.0]).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    at_c, small, large = pseudo_huber(torch.zeros(3, 1, 2, 2), y, 0.1).tolist()
    assert at_c == pytest.approx(0.02**0.5 - 0.1, rel=1e-5)  # √(d² + c²) - c
    assert small == pytest.approx(1e-6 / (2 * 0.1), rel=1e-3)  # ≈ d² / 2c below c
    assert large == pytest.approx(10.0 - 0.1, rel=1e-3)  # ≈ |d| - c above it


def test_a_schedule_of_more_steps_than_timesteps_is_refused():
    with pytest.raises(ValueError, match="1..1000"):
        schedule(1001)
