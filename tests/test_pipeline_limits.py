"""What one call may ask for, and sampling that stops being finite: each fault reproduced, each refused
with an error naming the argument or the cause, before the memory or the time is spent."""

import time

import pytest
import torch

from pipelines import TextToImagePipeline
from pipelines.inputs import Limits
from pipelines.sampling import NonFiniteSampleError
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components


@pytest.fixture
def pipe():
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, **kw):
    kw = dict(num_inference_steps=1, output_type="np", generator=torch.Generator().manual_seed(0)) | kw
    return pipe("a red circle", **kw).images


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(num_images_per_prompt=10**5), "pipe.limits.max_images"),
        (dict(num_images_per_prompt=10**7), "pipe.limits.max_images"),
        (dict(height=10**6), "pipe.limits.max_side"),
        (dict(width=10**6), "pipe.limits.max_side"),
        (dict(num_images_per_prompt=200, height=4096, width=4096), "pipe.limits.max_pixels"),
        (dict(num_inference_steps=10**6), "pipe.limits.max_steps"),
    ],
)
def test_resource_bombs_are_refused_at_once_naming_the_argument_and_the_override(pipe, kwargs, named):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=next(iter(kwargs))) as error:
        call(pipe, **kwargs)
    assert named in str(error.value) and "pipe.limits = None" in str(error.value)
    assert f"pipe.limits = Limits({named.split('.')[-1]}=" in str(error.value)
    assert time.perf_counter() - start < 1.0  # before any work


def test_limits_can_be_raised_or_lifted(pipe):
    pipe.limits = Limits(max_images=2)
    with pytest.raises(ValueError, match="max_images=2"):
        call(pipe, num_images_per_prompt=3)
    pipe.limits = Limits(max_images=3)
    assert call(pipe, num_images_per_prompt=3).shape == (3, 32, 32, 3)
    pipe.limits = None
    assert call(pipe, num_images_per_prompt=3, height=40).shape == (3, 40, 32, 3)
    assert TextToImagePipeline.limits == Limits()  # the class default is untouched


def test_absurd_num_train_timesteps_is_refused_before_any_table():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="num_train_timesteps must be an int in \\[1, 100000\\]"):
        DDPMScheduler(num_train_timesteps=10**8)
    with pytest.raises(ValueError, match="num_train_timesteps"):
        DDPMScheduler.from_config({"num_train_timesteps": 0})
    assert time.perf_counter() - start < 1.0
    assert len(DDPMScheduler(num_train_timesteps=4000)) == 4000  # long chains of real use still work


def test_nan_latents_are_refused_naming_latents(pipe):
    with pytest.raises(ValueError, match="latents contain NaN"):
        call(pipe, latents=torch.full((1, 4, 8, 8), float("nan")))


def test_huge_guidance_scale_names_guidance_instead_of_returning_nan_images(pipe):
    with pytest.raises(NonFiniteSampleError, match="guidance_scale=1e\\+308"):
        call(pipe, guidance_scale=1e308, num_inference_steps=2)


def test_a_unet_that_outputs_nan_is_named(pipe):
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteSampleError, match="U-Net's noise prediction is NaN"):
        call(pipe, guidance_scale=1.0)
