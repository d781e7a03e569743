"""guidance_interval: classifier-free guidance on the steps whose timestep lies in (lo, hi) only, one
conditional U-Net pass on the others (SD and SDXL pipelines alike)."""

import numpy as np
import pytest
import torch

from pipelines import TextToImageXLPipeline
from sdlite.models_xl import build_components_xl

STEPS = 4


@pytest.fixture(scope="module")
def pipe_xl():
    p = TextToImageXLPipeline(**build_components_xl("tiny-sdxl", seed=0).as_dict())
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, **kw):
    kw = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np") | kw
    return pipe("a red circle", **kw).images


def batch_sizes(pipe, **kw):
    """The U-Net's batch size at each step of one call."""
    sizes = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        run(pipe, **kw)
    finally:
        hook.remove()
    return sizes


def test_an_interval_holding_every_timestep_changes_nothing(pipe):
    everywhere = run(pipe, guidance_scale=3.0, guidance_interval=(0, 1000))
    assert np.array_equal(run(pipe, guidance_scale=3.0), everywhere)


@pytest.mark.parametrize("which", ["pipe", "pipe_xl"])
def test_an_interval_holding_no_timestep_gives_the_unguided_images(which, request):
    p = request.getfixturevalue(which)
    unguided = run(p, guidance_scale=1.0)
    outside = run(p, guidance_scale=3.0, guidance_interval=(2000, 3000))
    np.testing.assert_allclose(outside, unguided, atol=1e-6)
    assert not np.allclose(run(p, guidance_scale=3.0), unguided, atol=1e-3)  # guidance does change them


def test_only_the_steps_inside_the_interval_take_both_passes(pipe):
    pipe.scheduler.set_timesteps(STEPS)
    timesteps = [int(t) for t in pipe.scheduler.timesteps]  # 751, 501, 251, 1 with steps_offset 1
    sizes = batch_sizes(pipe, guidance_scale=3.0, guidance_interval=(0, 600))
    assert sizes == [2 if t <= 600 else 1 for t in timesteps]
    assert sizes.count(2) == 3 and sizes.count(1) == 1


@pytest.mark.parametrize("interval", [(600, 0), (-1, 500), (0, float("nan")), (0,), "0-600"])
def test_a_bad_interval_is_refused_naming_the_argument(pipe, interval):
    with pytest.raises(ValueError, match="guidance_interval"):
        run(pipe, guidance_scale=3.0, guidance_interval=interval)
