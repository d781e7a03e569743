"""sdlite's DDPMScheduler as a drop-in for diffusers': same numbers, same configs, same pipelines.

Three references, because diffusers stores ᾱ_t in float32 and we keep float64:
  * ``diffusers_on(ours)``: diffusers' DDPMScheduler computing from our float64 ᾱ_t. Same algorithm,
    same random draws, same ᾱ: must agree to ATOL = 1e-5.
  * a float64 run of that (float32 noise, float64 sample): the exact answer; we must be within ATOL.
  * stock diffusers: 1 - ᾱ_t rounded to float32 is off by up to ~6e-8/(1 - ᾱ_t) relatively, i.e.
    ~6e-4 at t = 0 of the linear schedule, and the noise scale √β̃_t inherits it. Stock agreement
    is therefore checked at STOCK_ATOL, and test_stock_diffusers_gap_is_its_float32_alphas_cumprod
    pins down that the gap is diffusers' rounding, not ours.
"""

import json

import diffusers
import numpy as np
import pytest
import torch

from sdlite.ddpm import DDPMScheduler, DDPMSchedulerOutput

ATOL = 1e-5
STOCK_ATOL = 1e-3
T = 1000


def diffusers_on(ours: DDPMScheduler) -> diffusers.DDPMScheduler:
    """diffusers' DDPMScheduler with our config, computing from our float64 ᾱ instead of its float32."""
    ref = diffusers.DDPMScheduler.from_config(ours.config)
    ref.alphas_cumprod = ours.alphas_cumprod.clone()
    ref.one = torch.tensor(1.0, dtype=torch.float64)
    return ref


def fake_model(alphas_cumprod: torch.Tensor, prediction_type: str, data_std: float = 0.5):
    """A fixed stand-in for a network: the Bayes-optimal prediction for x_0 ~ N(0, data_std²), plus
    a nonlinear wobble. Sensible outputs keep the samples O(1), so absolute tolerances mean something."""

    def model(x: torch.Tensor, t) -> torch.Tensor:
        ab = alphas_cumprod[t].double()
        d = ab * data_std**2 + 1 - ab
        x0, eps = ab.sqrt() * data_std**2 / d * x, (1 - ab).sqrt() / d * x
        v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
        out = {"epsilon": eps, "sample": x0, "v_prediction": v}[prediction_type]
        return (out + 0.05 * torch.sin(3 * x)).float()  # float32, like a network's output

    return model


def sample_loop(scheduler, x, model, num_inference_steps=None, timesteps=None, dtype=torch.float32):
    """Algorithm 2 through scheduler.step; returns the final sample and every step's x̂_0."""
    scheduler.set_timesteps(num_inference_steps, timesteps=timesteps)
    generator = torch.Generator().manual_seed(1)
    x, pred_x0 = x.to(dtype), []
    for t in scheduler.timesteps:
        x, x0 = scheduler.step(model(x, t), t, x, generator=generator, return_dict=False)
        pred_x0.append(x0)
    return x, torch.stack(pred_x0)


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


SCHEDULES = {
    "linear": dict(),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "trained": dict(trained_betas=np.linspace(2e-4, 0.03, T).tolist()),
}


def _loop_cases():
    cases = []
    for name, schedule in SCHEDULES.items():  # every schedule with each spacing and step count
        for steps, spacing in [(1000, "leading"), (50, "trailing"), (10, "linspace")]:
            cases.append(
                pytest.param(schedule | dict(timestep_spacing=spacing), steps, id=f"{name}-{spacing}-{steps}")
            )
    for prediction in ["epsilon", "v_prediction", "sample"]:  # every model head with each variance
        for variance in ["fixed_small", "fixed_large"]:
            for clip in [True, False]:
                config = dict(prediction_type=prediction, variance_type=variance, clip_sample=clip)
                cases.append(pytest.param(config, 50, id=f"{prediction}-{variance}-clip{clip}"))
    zsnr = dict(SCHEDULES["scaled_linear"], rescale_betas_zero_snr=True, clip_sample=False)
    cases += [
        pytest.param(
            zsnr | dict(prediction_type="v_prediction", timestep_spacing="trailing"), 1000, id="zsnr-v-1000"
        ),
        pytest.param(
            zsnr | dict(prediction_type="v_prediction", timestep_spacing="trailing"), 10, id="zsnr-v-10"
        ),
        pytest.param(zsnr | dict(prediction_type="sample", timestep_spacing="linspace"), 25, id="zsnr-x0-25"),
        pytest.param(
            SCHEDULES["scaled_linear"] | dict(steps_offset=1, clip_sample=False), 50, id="sd15-offset1"
        ),
        pytest.param(dict(steps_offset=1, variance_type="fixed_large"), 10, id="offset1-fixed_large"),
        pytest.param(
            dict(thresholding=True, sample_max_value=1.5, prediction_type="sample"), 50, id="thresholding"
        ),
        pytest.param(dict(variance_type="fixed_small_log"), 50, id="fixed_small_log"),
        pytest.param(dict(clip_sample_range=0.5), 50, id="clip_range_0.5"),
    ]
    return cases


@pytest.mark.parametrize(("config", "steps"), _loop_cases())
def test_sampling_loop_matches_diffusers(config, steps):
    ours = DDPMScheduler(**config)
    model = fake_model(ours.alphas_cumprod, ours.config.prediction_type)
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x, pred_x0 = sample_loop(ours, x_T, model, steps)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    x_ref, pred_x0_ref = sample_loop(diffusers_on(ours), x_T, model, steps)
    assert max_diff(x, x_ref) <= ATOL
    # x̂_0 = (x_t - √(1-ᾱ_t) ε)/√ᾱ_t amplifies float32 rounding of x_t by 1/√ᾱ_t (~160 at t = 999).
    amplification = ours.alphas_cumprod[ours.timesteps].rsqrt().clamp(max=1e3).reshape(-1, 1, 1, 1, 1)
    assert ((pred_x0 - pred_x0_ref).abs() / amplification).max() <= ATOL
    x_exact, _ = sample_loop(diffusers_on(ours), x_T, model, steps, dtype=torch.float64)
    assert max_diff(x, x_exact) <= ATOL
    x_stock, _ = sample_loop(diffusers.DDPMScheduler(**config), x_T, model, steps)
    assert max_diff(x, x_stock) <= STOCK_ATOL


def test_custom_timesteps_loop_matches_diffusers():
    ours = DDPMScheduler(clip_sample=False)
    model = fake_model(ours.alphas_cumprod, "epsilon")
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    timesteps = [999, 900, 700, 400, 150, 40, 5, 0]
    x, _ = sample_loop(ours, x_T, model, timesteps=timesteps)
    x_ref, _ = sample_loop(diffusers_on(ours), x_T, model, timesteps=timesteps)
    assert max_diff(x, x_ref) <= ATOL


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("clip_sample", [True, False])
def test_single_steps_match_diffusers(variance_type, prediction_type, clip_sample):
    # Unlike the loops, steps from arbitrary (not model-made) inputs at the extreme timesteps.
    config = dict(variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample)
    ours = DDPMScheduler(**config)
    ref, stock = diffusers_on(ours), diffusers.DDPMScheduler(**config)
    g = torch.Generator().manual_seed(2)
    for t in [999, 998, 500, 10, 1, 0]:
        sample, model_output = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        out = ours.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        assert isinstance(out, DDPMSchedulerOutput)
        want = ref.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        assert max_diff(out.prev_sample, want.prev_sample) <= ATOL, t
        # Random ε at t = 999 makes |x̂_0| ~ 1/√ᾱ ~ 160: compare x̂_0 relative to its size.
        scale = max(1.0, want.pred_original_sample.abs().max().item())
        assert max_diff(out.pred_original_sample, want.pred_original_sample) <= ATOL * scale, t
        stock_out = stock.step(model_output, t, sample, generator=torch.Generator().manual_seed(t))
        assert max_diff(out.prev_sample, stock_out.prev_sample) <= STOCK_ATOL, t


def test_stock_diffusers_gap_is_its_float32_alphas_cumprod():
    # Cosine schedule, 1000 steps: we stay within ATOL of the float64 answer, stock diffusers does
    # not. If diffusers ever stores ᾱ in float64 this fails: then tighten STOCK_ATOL to ATOL.
    ours = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    model = fake_model(ours.alphas_cumprod, "epsilon")
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x, _ = sample_loop(ours, x_T, model, 1000)
    x_exact, _ = sample_loop(diffusers_on(ours), x_T, model, 1000, dtype=torch.float64)
    x_stock, _ = sample_loop(diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2"), x_T, model, 1000)
    assert max_diff(x, x_exact) <= ATOL < max_diff(x_stock, x_exact)


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_add_noise_matches_diffusers(schedule, zero_snr):
    config = SCHEDULES[schedule] | dict(rescale_betas_zero_snr=zero_snr)
    ours = DDPMScheduler(**config)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(T, 3, 4, 4, generator=g), torch.randn(T, 3, 4, 4, generator=g)
    t = torch.arange(T)
    x_t = ours.add_noise(x0, noise, t)
    assert max_diff(x_t, diffusers_on(ours).add_noise(x0, noise, t)) <= ATOL
    assert max_diff(x_t, diffusers.DDPMScheduler(**config).add_noise(x0, noise, t)) <= STOCK_ATOL
    assert torch.equal(x_t, ours.q_sample(x0, t, noise))
    v = ours.get_velocity(x0, noise, t)
    assert max_diff(v, diffusers_on(ours).get_velocity(x0, noise, t)) <= ATOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_add_noise_and_step_keep_the_callers_dtype(dtype):
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    x_t = sched.add_noise(x0.to(dtype), noise.to(dtype), t)
    assert x_t.dtype == dtype
    exact = sched.add_noise(x0.double(), noise.double(), t)
    assert max_diff(x_t, exact) <= 4 * 3 * torch.finfo(dtype).eps * 5  # |x_t| < ~5, a few roundings
    out = sched.step(noise.to(dtype), 500, x_t, generator=g)
    assert out.prev_sample.dtype == dtype and out.pred_original_sample.dtype == dtype
    assert sched.add_noise(x0.to("meta"), noise.to("meta"), t).device.type == "meta"  # follows the device


def test_timesteps_match_diffusers_for_every_step_count():
    # diffusers' "trailing" can return n + 1 timesteps ending in -1 (61 steps of 1000, e.g.); we
    # return the first n, which are otherwise identical.
    for spacing in ["leading", "trailing", "linspace"]:
        ours, ref = DDPMScheduler(timestep_spacing=spacing), diffusers.DDPMScheduler(timestep_spacing=spacing)
        for n in range(1, T + 1, 3):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            want = (
                ref.timesteps[:-1]
                if len(ref.timesteps) == n + 1 and ref.timesteps[-1] == -1
                else ref.timesteps
            )
            assert torch.equal(ours.timesteps, want), (spacing, n)
            if n in (4, 52):
                assert [ours.previous_timestep(t) for t in want] == [ref.previous_timestep(t) for t in want]


def test_from_config_of_diffusers_ddpm_and_a_real_sd15_pndm_config():
    ref = diffusers.DDPMScheduler(
        beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1
    )
    ours = DDPMScheduler.from_config(ref.config)
    assert {k: v for k, v in ours.config.items() if not k.startswith("_")} == {
        k: v for k, v in ref.config.items() if not k.startswith("_")
    }
    # runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json, verbatim.
    sd15 = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    sched = DDPMScheduler.from_config(sd15)  # PNDM-only keys are not passed to __init__ ...
    assert dict(sched.config) == dict(diffusers.DDPMScheduler.from_config(sd15).config)  # ... as in diffusers
    assert sched.config.steps_offset == 1 and sched.config.beta_schedule == "scaled_linear"
    want = diffusers.DDPMScheduler.from_config(sd15).alphas_cumprod.double()
    assert max_diff(sched.alphas_cumprod, want) < 1e-6
    assert DDPMScheduler.from_config({"variance_type": "fixed_small"}).config.num_train_timesteps == T
    with pytest.raises(NotImplementedError):
        DDPMScheduler(variance_type="learned_range")


def test_save_pretrained_round_trip_and_diffusers_reads_it(tmp_path):
    sched = DDPMScheduler(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"
    )
    sched.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDPMScheduler" and saved["timestep_spacing"] == "trailing"
    again = DDPMScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}
    assert public(again.config) == public(sched.config)
    assert torch.equal(again.alphas_cumprod, sched.alphas_cumprod)
    theirs = diffusers.DDPMScheduler.from_pretrained(tmp_path)
    assert theirs.config.prediction_type == "v_prediction"
    assert len(DDPMScheduler()) == T and DDPMScheduler.order == 1 and sched.init_noise_sigma == 1.0
    x = torch.randn(1, 4, 2, 2)
    assert sched.scale_model_input(x, 10) is x


def _tiny_tokenizer(folder):
    """A CLIP tokenizer over single characters (no merges): enough to run the pipeline offline."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77)


def _tiny_sd_components(tmp_path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        sample_size=16,
    )
    text_config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    text_encoder = CLIPTextModel(text_config).eval()
    return dict(
        unet=unet.eval(), vae=vae.eval(), text_encoder=text_encoder, tokenizer=_tiny_tokenizer(tmp_path)
    )


def test_stable_diffusion_pipeline_runs_with_our_scheduler_and_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    components = _tiny_sd_components(tmp_path)
    sd15 = dict(SCHEDULES["scaled_linear"], steps_offset=1, clip_sample=False)
    runs = {
        "ours": DDPMScheduler(**sd15),
        "diffusers": diffusers.DDPMScheduler(**sd15),
        "ours_fixed_large": DDPMScheduler(**sd15, variance_type="fixed_large"),  # should differ
    }
    images = {}
    for name, scheduler in runs.items():
        pipe = StableDiffusionPipeline(
            **components,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        assert pipe.scheduler is scheduler
        pipe.set_progress_bar_config(disable=True)
        images[name] = pipe(
            "a red square",
            height=16,
            width=16,
            num_inference_steps=10,
            guidance_scale=3.0,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
    assert images["ours"].shape == (1, 16, 16, 3) and np.isfinite(images["ours"]).all()
    assert np.abs(images["ours"] - images["diffusers"]).max() <= 1e-4
    assert np.abs(images["ours"] - images["ours_fixed_large"]).max() > 1e-3  # the scheduler matters here


def test_log_variance_types_are_the_same_variances():
    # "*_log" only changes how diffusers computes σ_t; for fixed_large_log its step takes √(log β_t),
    # NaN, so we give it fixed_large's σ_t² = β_t, which is what the name describes.
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for base in ["fixed_small", "fixed_large"]:
        plain, logged = DDPMScheduler(variance_type=base), DDPMScheduler(variance_type=base + "_log")
        model = fake_model(plain.alphas_cumprod, "epsilon")
        assert torch.equal(sample_loop(plain, x_T, model, 20)[0], sample_loop(logged, x_T, model, 20)[0])


def test_extract_gathers_a_device_t_on_its_device_with_the_same_values():
    """Training draws t on the accelerator; extract must gather there (no host sync) and give the
    float64 table's values rounded once to x's dtype. The meta device stands in for a GPU here: it
    checks the path and shapes; values are compared on the CPU path."""
    from sdlite.ddpm import extract

    sched = DDPMScheduler(num_train_timesteps=1000)
    t = torch.tensor([0, 17, 999])
    x = torch.zeros(3, 4, 2, 2)
    on_cpu = extract(sched.sqrt_alphas_cumprod, t, x)
    assert on_cpu.shape == (3, 1, 1, 1) and on_cpu.dtype == torch.float32
    expected = sched.sqrt_alphas_cumprod[t].float().reshape(3, 1, 1, 1)
    assert torch.equal(on_cpu, expected)
    on_meta = extract(sched.sqrt_alphas_cumprod, t.to("meta"), x.to("meta", torch.bfloat16))
    assert on_meta.device.type == "meta" and on_meta.shape == (3, 1, 1, 1) and on_meta.dtype == torch.bfloat16
