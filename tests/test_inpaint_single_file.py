"""Inpainting checkpoints (a 9-channel conv_in) load from and save to single files, SD and SDXL."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from pipelines import InpaintPipeline, InpaintXLPipeline, TextToImagePipeline
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl


def with_inpainting_unet(parts) -> dict:
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**parts.unet.config, "in_channels": 9})
    return {**parts.as_dict(), "unet": unet}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_sd_inpainting_checkpoint_round_trips_with_its_nine_channels(tmp_path):
    pipe = InpaintPipeline(**with_inpainting_unet(build_components("tiny", seed=0)))
    path = pipe.save_single_file(tmp_path / "inpaint.safetensors")
    loaded = InpaintPipeline.from_single_file(path, config="tiny")  # the preset's U-Net reads 4
    assert loaded.unet.config.in_channels == 9
    assert_same_weights(loaded.unet, pipe.unet)
    assert InpaintPipeline.from_single_file(path, config="tiny").unet.config.in_channels == 9


def test_sdxl_inpainting_checkpoint_round_trips_with_its_nine_channels(tmp_path):
    pipe = InpaintXLPipeline(**with_inpainting_unet(build_components_xl("tiny-sdxl", seed=0)))
    path = pipe.save_single_file(tmp_path / "inpaint-xl.safetensors")
    loaded = InpaintXLPipeline.from_single_file(path, config="tiny-sdxl")
    assert loaded.unet.config.in_channels == 9
    assert_same_weights(loaded.unet, pipe.unet)


def test_an_ordinary_checkpoint_still_loads_with_four_channels(tmp_path):
    pipe = InpaintPipeline(**build_components("tiny", seed=0).as_dict())
    path = pipe.save_single_file(tmp_path / "plain.safetensors")
    assert InpaintPipeline.from_single_file(path, config="tiny").unet.config.in_channels == 4


def test_text_to_image_names_the_inpainting_pipeline_for_an_inpainting_checkpoint(tmp_path):
    pipe = InpaintPipeline(**with_inpainting_unet(build_components("tiny", seed=0)))
    path = pipe.save_single_file(tmp_path / "inpaint.safetensors")
    text_to_image = TextToImagePipeline.from_single_file(path, config="tiny")
    with pytest.raises(ValueError, match="an inpainting model: use InpaintPipeline"):
        text_to_image("a red circle", num_inference_steps=1)
