"""ImageToImagePipeline draws what diffusers' StableDiffusionImg2ImgPipeline does."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline

from pipelines import ImageToImagePipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components

PROMPTS = ["a red circle", "a blue square"]
STEPS = 5


def seed(n=0):
    return torch.Generator().manual_seed(n)


def picture(n=0, size=32) -> PIL.Image.Image:
    rng = np.random.default_rng(n)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def parts():
    return build_components("tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = ImageToImagePipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=PROMPTS, **kw):
    kw = {"image": picture(), "num_inference_steps": STEPS, "generator": seed(), "output_type": "np"} | kw
    return pipe(prompt, **kw).images


def pair(parts, scheduler_class):
    """Our pipeline and diffusers', same weights, each with its own scheduler of one config."""
    models = {k: v for k, v in parts.as_dict().items() if k != "scheduler"}
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    ours = ImageToImagePipeline(**models, scheduler=scheduler_class.from_config(config))
    theirs = StableDiffusionImg2ImgPipeline(
        **models, scheduler=scheduler_class.from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("strength", [0.4, 1.0])
@pytest.mark.parametrize(
    "scheduler_class",
    [DDPMScheduler, DiffusersDDPM, EulerDiscreteScheduler, DPMSolverMultistepScheduler],
    ids=["sdlite-ddpm", "diffusers-ddpm", "euler", "dpm++"],
)
def test_images_equal_diffusers_img2img_pipeline(parts, scheduler_class, strength):
    ours, theirs = pair(parts, scheduler_class)
    a = run(ours, strength=strength, guidance_scale=6.0)
    b = run(theirs, strength=strength, guidance_scale=6.0)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4


def test_a_generator_per_image_and_unguided_match_diffusers(parts):
    ours, theirs = pair(parts, DDPMScheduler)
    kw = dict(image=[picture(1), picture(2)], guidance_scale=1.0, strength=0.7)
    a, b = (run(p, generator=[seed(3), seed(4)], **kw) for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1e-4


def test_strength_runs_the_last_share_of_the_schedule(pipe):
    seen = []
    run(
        pipe,
        num_inference_steps=10,
        strength=0.3,
        callback_on_step_end=lambda p, i, t, x: seen.append(int(t)),
    )
    pipe.scheduler.set_timesteps(10)
    assert seen == pipe.scheduler.timesteps[-3:].tolist()


def test_low_strength_stays_nearer_the_image_than_high(pipe):
    image = np.asarray(picture(), dtype=np.float32) / 255
    near, far = (np.abs(run(pipe, strength=s)[0] - image).mean() for s in (0.2, 1.0))
    assert near < far


def test_each_prompt_starts_from_its_own_image(pipe):
    images, gens = [picture(1), picture(2)], [seed(i) for i in range(4)]
    both = run(pipe, image=images, generator=gens, num_images_per_prompt=2)
    alone = run(pipe, PROMPTS[1], image=images[1], generator=seed(2))
    assert np.abs(both[2] - alone[0]).max() <= 1e-5


def test_tensor_array_and_pil_images_give_the_same_result(pipe):
    pil = picture()
    array = np.asarray(pil, dtype=np.float32)[None] / 255  # (1, H, W, 3) in [0, 1]
    tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    a, b, c = (run(pipe, PROMPTS[0], image=im) for im in (pil, array, tensor))
    assert np.abs(a - b).max() <= 1e-5 and np.abs(a - c).max() <= 1e-5


def test_output_size_is_the_images_rounded_to_the_vae_factor(pipe):
    f = pipe.vae_scale_factor
    out = run(pipe, PROMPTS[0], image=picture(size=40 + f - 1))
    assert out.shape == (1, 40, 40, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strength": 1.5}, "strength must be a number in [0, 1]"),
        ({"strength": 0.1}, "leaves no step to run"),
        ({"image": "cat.png"}, "image must be a PIL image"),
        ({"image": torch.zeros(1, 2, 32, 32)}, "image must be (B, C, H, W)"),
        ({"image": [picture(0), picture(1), picture(2)]}, "image holds 3 images for 2 prompts"),
        ({"image": [picture(0), np.zeros((32, 32, 3))]}, "image must be a PIL image"),
    ],
)
def test_bad_image_argument_raises_value_error_naming_it(pipe, kwargs, message):
    with pytest.raises(ValueError) as error:
        run(pipe, **kwargs)
    assert message in str(error.value)
