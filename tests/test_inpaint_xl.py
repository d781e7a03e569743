"""InpaintXLPipeline paints what diffusers' StableDiffusionXLInpaintPipeline does, with either U-Net."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, UNet2DConditionModel

from pipelines import InpaintXLPipeline
from sdlite.models_xl import build_components_xl

PROMPTS = ["a red circle", "a blue square on green"]


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
    return build_components_xl("tiny-sdxl", seed=0)


def components(parts, kind: str, scheduler=None) -> dict:
    unet = parts.unet
    if kind == "inpainting":  # 9 input channels: x_t, the mask, the masked image's latents
        torch.manual_seed(0)
        unet = UNet2DConditionModel.from_config({**parts.unet.config, "in_channels": 9})
    return {**parts.as_dict(), "unet": unet, **({"scheduler": scheduler} if scheduler else {})}


def pair(components: dict):
    ours = InpaintXLPipeline(**components)
    theirs = StableDiffusionXLInpaintPipeline(**components, add_watermarker=False)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def images(pipe, **kwargs):
    kwargs = {
        "prompt": PROMPTS,
        "image": picture(),
        "mask_image": box_mask(),
        "num_inference_steps": 4,
    } | kwargs
    return pipe(**{"output_type": "np"} | kwargs, generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("strength", [0.6, 0.9999, 1.0])
@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
def test_same_images_as_diffusers_sdxl_inpaint(parts, kind, strength):
    ours, theirs = pair(components(parts, kind))
    a, b = (images(p, strength=strength, guidance_scale=5.0) for p in (ours, theirs))
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4


@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
def test_same_images_as_diffusers_with_euler_padding_mask_crop_and_denoising_end(parts, kind):
    scheduler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    ours, theirs = pair(components(parts, kind, scheduler))
    kw = dict(prompt=PROMPTS[0], image=picture(size=48), mask_image=box_mask(48, (20, 4, 30, 16)))
    kw |= dict(padding_mask_crop=2, output_type="pil", denoising_end=0.7, num_inference_steps=6)
    a, b = (np.asarray(images(p, **kw)[0], dtype=np.float32) for p in (ours, theirs))
    assert a.shape == b.shape == (48, 48, 3)
    assert np.abs(a - b).max() <= 1  # PIL output: uint8, a rounding step at most


def test_mask_count_that_fits_no_prompt_is_refused(parts):
    pipe = InpaintXLPipeline(**parts.as_dict())
    with pytest.raises(ValueError, match="mask_image holds 3 images for 2 prompts"):
        images(pipe, mask_image=[box_mask()] * 3)


@pytest.mark.parametrize("kind", ["ordinary", "inpainting"])
def test_a_step_end_callback_reads_and_replaces_the_mask_and_masked_image_latents_as_in_diffusers(
    parts, kind
):
    ours, theirs = pair(components(parts, kind))
    assert ours._callback_tensor_inputs == theirs._callback_tensor_inputs

    def callback(pipe, i, t, tensors):  # at the first step: paint everywhere, halve the masked image
        mask, masked = tensors["mask"], tensors["masked_image_latents"]
        return {"mask": torch.ones_like(mask), "masked_image_latents": masked / 2} if i == 0 else {}

    kw = dict(strength=0.7, guidance_scale=5.0, callback_on_step_end=callback)
    kw["callback_on_step_end_tensor_inputs"] = ["latents", "mask", "masked_image_latents", "add_time_ids"]
    a, b = (images(p, **kw) for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - images(ours, strength=0.7, guidance_scale=5.0)).max() > 1e-3  # the replacement counted
