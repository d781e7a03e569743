"""InpaintPipeline paints what diffusers' StableDiffusionInpaintPipeline does, with either kind of U-Net."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel

from pipelines import InpaintPipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


def seed(n=0):
    return torch.Generator().manual_seed(n)


def picture(n=0, size=32) -> PIL.Image.Image:
    rng = np.random.default_rng(n)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def box_mask(size=32, box=(8, 8, 20, 24)) -> PIL.Image.Image:
    """White (paint) inside box = (top, left, bottom, right), black elsewhere."""
    mask = np.zeros((size, size), dtype=np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return PIL.Image.fromarray(mask)


@pytest.fixture(scope="module")
def parts():
    return build_components("tiny", seed=0)


def inpainting_unet(parts):
    """A U-Net of the tiny preset's shape that reads 9 channels: x_t, the mask, the masked image."""
    torch.manual_seed(0)
    return UNet2DConditionModel.from_config({**parts.unet.config, "in_channels": 9})


@pytest.fixture(scope="module", params=["ordinary", "inpainting"])
def pipe(parts, request):
    unet = parts.unet if request.param == "ordinary" else inpainting_unet(parts)
    pipe = InpaintPipeline(**{**parts.as_dict(), "unet": unet})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=PROMPTS, **kw):
    kw = {"image": picture(), "mask_image": box_mask(), "num_inference_steps": STEPS} | kw
    kw = {"generator": seed(), "output_type": "np"} | kw
    return pipe(prompt, **kw).images


def pair(parts, scheduler_class, unet):
    models = {k: v for k, v in parts.as_dict().items() if k not in ("scheduler", "unet")}
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    ours = InpaintPipeline(**models, unet=unet, scheduler=scheduler_class.from_config(config))
    theirs = StableDiffusionInpaintPipeline(
        **models, unet=unet, scheduler=scheduler_class.from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("strength", [0.5, 1.0])
@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
@pytest.mark.parametrize(
    "scheduler_class",
    [DDPMScheduler, DiffusersDDPM, EulerDiscreteScheduler],
    ids=["sdlite-ddpm", "diffusers-ddpm", "euler"],
)
def test_images_equal_diffusers_inpaint_pipeline(parts, scheduler_class, kind, strength):
    unet = parts.unet if kind == "ordinary" else inpainting_unet(parts)
    ours, theirs = pair(parts, scheduler_class, unet)
    a, b = (run(p, strength=strength, guidance_scale=6.0) for p in (ours, theirs))
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
def test_padding_mask_crop_and_unguided_match_diffusers(parts, kind):
    unet = parts.unet if kind == "ordinary" else inpainting_unet(parts)
    ours, theirs = pair(parts, DDPMScheduler, unet)
    kw = dict(padding_mask_crop=2, guidance_scale=1.0, output_type="pil", image=picture(size=48))
    kw["mask_image"] = box_mask(48, (20, 4, 30, 16))
    a, b = (np.asarray(run(p, **kw)[0], dtype=np.float32) for p in (ours, theirs))
    assert a.shape == b.shape == (48, 48, 3)
    assert np.abs(a - b).max() <= 1  # PIL output: uint8, a rounding step at most


def test_ordinary_unet_keeps_the_unmasked_latents_of_the_image(parts):
    pipe = InpaintPipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    f = pipe.vae_scale_factor
    out = run(pipe, PROMPTS[0], output_type="latent")  # (1, C, h, w)
    image = pipe.image_processor.preprocess(picture())
    x0 = pipe.encode_image(image, seed())  # the first draw of the call's generator, as the call made it
    known = np.asarray(box_mask())[::f, ::f] < 128
    assert torch.equal(out[0][:, torch.from_numpy(known)], x0[0][:, torch.from_numpy(known)])
    assert not torch.equal(out[0][:, ~torch.from_numpy(known)], x0[0][:, ~torch.from_numpy(known)])


def test_strength_one_starts_from_the_given_latents(pipe):
    h = 32 // pipe.vae_scale_factor
    x_T = torch.randn(1, 4, h, h, generator=seed(5))
    a = run(pipe, PROMPTS[0], latents=x_T, generator=seed(1))
    b = run(pipe, PROMPTS[0], latents=x_T, generator=seed(1))
    c = run(pipe, PROMPTS[0], latents=torch.randn(1, 4, h, h, generator=seed(6)), generator=seed(1))
    assert np.abs(a - b).max() == 0 and np.abs(a - c).max() > 1e-3


def test_blurred_mask_gives_a_soft_edge_that_binarizes(pipe):
    blurred = pipe.mask_processor.blur(box_mask(), blur_factor=2)
    values = np.unique(np.asarray(blurred))
    assert len(values) > 2  # a soft edge before the pipeline binarizes it at 0.5
    assert run(pipe, PROMPTS[0], mask_image=blurred).shape == (1, 32, 32, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mask_image": None}, "mask_image must be a PIL image"),
        ({"mask_image": [box_mask()] * 3}, "mask_image holds 3 images for 2 prompts"),
        ({"padding_mask_crop": 4, "output_type": "np"}, "padding_mask_crop needs output_type='pil'"),
        (
            {"padding_mask_crop": 4, "image": torch.zeros(1, 3, 32, 32)},
            "padding_mask_crop needs image as one PIL",
        ),
        ({"padding_mask_crop": -1}, "padding_mask_crop must be None or an int >= 0"),
        (
            {"strength": 0.5, "latents": torch.zeros(2, 4, 8, 8)},
            "latents (the starting noise x_T) need strength=1",
        ),
    ],
)
def test_bad_inpaint_argument_raises_value_error_naming_it(pipe, kwargs, message):
    with pytest.raises(ValueError) as error:
        run(pipe, **kwargs)
    assert message in str(error.value)


def test_unet_of_another_width_names_the_two_kinds(parts):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**parts.unet.config, "in_channels": 6})
    pipe = InpaintPipeline(**{**parts.as_dict(), "unet": unet})
    with pytest.raises(ValueError, match="an ordinary U-Net"):
        run(pipe)


def test_the_four_image_pipelines_are_sdlites_public_api():
    import pipelines
    import sdlite

    names = ("ImageToImagePipeline", "ImageToImageXLPipeline", "InpaintPipeline", "InpaintXLPipeline")
    assert all(getattr(sdlite, n) is getattr(pipelines, n) for n in names)
    assert set(names) <= set(sdlite.__all__) & set(pipelines.__all__)


def test_one_image_and_a_mask_per_prompt_keep_each_prompts_own_unmasked_region(parts):
    pipe = InpaintPipeline(**parts.as_dict())  # an ordinary U-Net: x_0 itself outside the mask
    pipe.set_progress_bar_config(disable=True)
    masks, gens = [box_mask(), box_mask(box=(0, 0, 8, 8))], [seed(i) for i in range(4)]
    both = run(pipe, mask_image=masks, num_images_per_prompt=2, generator=gens, output_type="latent")
    f = pipe.vae_scale_factor
    x0 = pipe.encode_image(pipe.image_processor.preprocess(picture()), seed(0))[0]  # with the first generator
    painted = [torch.from_numpy(np.asarray(m)[::f, ::f] > 127) for m in masks]
    only_first = painted[0] & ~painted[1]
    assert both.shape[0] == 4
    assert torch.allclose(both[2][:, only_first], x0[:, only_first], atol=1e-6)  # prompt 2 keeps it
    assert not torch.allclose(both[0][:, only_first], x0[:, only_first], atol=1e-3)  # prompt 1 paints it


def mask_changing_callback(seen: list):
    """At the first step, paint everywhere and halve the masked image's latents; record what it saw."""

    def callback(pipe, i, t, tensors):
        seen.append({name: tuple(x.shape) for name, x in tensors.items()})
        if i > 0:
            return {}
        return {
            "mask": torch.ones_like(tensors["mask"]),
            "masked_image_latents": tensors["masked_image_latents"] / 2,
        }

    return callback


@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
def test_a_step_end_callback_reads_and_replaces_the_mask_and_masked_image_latents_as_in_diffusers(
    parts, kind
):
    unet = parts.unet if kind == "ordinary" else inpainting_unet(parts)
    ours, theirs = pair(parts, DDPMScheduler, unet)
    names = ["latents", "mask", "masked_image_latents"]
    assert set(ours._callback_tensor_inputs) == set(theirs._callback_tensor_inputs)
    seen_ours, seen_theirs = [], []
    kw = dict(strength=0.7, guidance_scale=6.0, callback_on_step_end_tensor_inputs=names)
    a = run(ours, **kw, callback_on_step_end=mask_changing_callback(seen_ours))
    b = run(theirs, **kw, callback_on_step_end=mask_changing_callback(seen_theirs))
    assert seen_ours == seen_theirs and seen_ours[0]["mask"] == (4, 1, 8, 8)  # doubled for guidance
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - run(ours, strength=0.7, guidance_scale=6.0)).max() > 1e-3  # the replacement counted
