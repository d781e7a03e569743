"""ImageToImageXLPipeline draws what diffusers' StableDiffusionXLImg2ImgPipeline does."""

import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    EulerDiscreteScheduler,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from pipelines import ImageToImageXLPipeline, InpaintXLPipeline, TextToImageXLPipeline
from sdlite.models import ModelFolderError
from sdlite.models_xl import build_components_xl

PROMPTS = ["a red circle", "a blue square on green"]


def picture(n=0, size=32) -> PIL.Image.Image:
    rng = np.random.default_rng(n)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def parts():
    return build_components_xl("tiny-sdxl", seed=0)


def pair(components: dict, **config):
    ours = ImageToImageXLPipeline(**components, **config)
    theirs = StableDiffusionXLImg2ImgPipeline(**components, **config, add_watermarker=False)
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def images(pipe, **kwargs):
    kwargs = {"prompt": PROMPTS, "image": picture(), "num_inference_steps": 5, "output_type": "np", **kwargs}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def assert_same_images(ours, theirs, **kwargs):
    a, b = images(ours, **kwargs), images(theirs, **kwargs)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4


CASES = {
    "guided_at_half_strength": dict(guidance_scale=5.0, strength=0.5),
    "unguided_at_full_strength": dict(guidance_scale=1.0, strength=1.0),
    "with_prompt_2_two_per_prompt_and_size_conditioning": dict(
        prompt_2=["circle", "square"],
        num_images_per_prompt=2,
        strength=0.6,
        original_size=(64, 48),
        crops_coords_top_left=(8, 4),
        target_size=(32, 32),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_images_as_diffusers_sdxl_img2img(parts, case):
    assert_same_images(*pair(parts.as_dict()), **CASES[case])


def test_same_images_as_diffusers_with_euler_and_denoising_end(parts):
    scheduler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    ours, theirs = pair({**parts.as_dict(), "scheduler": scheduler})
    assert_same_images(ours, theirs, strength=0.8, denoising_end=0.5, num_inference_steps=8)


def test_a_refiner_takes_over_where_the_base_stopped_as_in_diffusers(parts):
    base = TextToImageXLPipeline(**parts.as_dict())
    base.set_progress_bar_config(disable=True)
    theirs_base = StableDiffusionXLPipeline(**parts.as_dict(), add_watermarker=False)
    kw = dict(prompt=PROMPTS[0], num_inference_steps=6, denoising_end=0.6, output_type="latent")
    handed = base(**kw, generator=torch.Generator().manual_seed(1)).images
    theirs_handed = theirs_base(**kw, generator=torch.Generator().manual_seed(1)).images
    assert torch.allclose(handed, theirs_handed, atol=1e-5)
    ours, theirs = pair(parts.as_dict())
    seen = []
    kw = dict(prompt=PROMPTS[0], image=handed, num_inference_steps=6, denoising_start=0.6)
    a = images(ours, **kw, callback_on_step_end=lambda p, i, t, x: seen.append(int(t)) or x)
    b = images(theirs, **kw)
    assert np.abs(a - b).max() <= 1e-4
    assert seen == [333, 167, 1]  # the steps below (1 - 0.6) T, which the base left


def test_the_refiners_aesthetic_score_conditions_like_diffusers(parts):
    """A U-Net whose added embedding reads five time ids (size, crop, score), as SDXL's refiner's."""
    config = dict(parts.unet.config)
    d, pooled = config["addition_time_embed_dim"], parts.text_encoder_2.config.projection_dim
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(
        {**config, "projection_class_embeddings_input_dim": 5 * d + pooled}
    )
    ours, theirs = pair({**parts.as_dict(), "unet": unet}, requires_aesthetics_score=True)
    assert_same_images(ours, theirs, guidance_scale=5.0, strength=0.7)
    low, high = (images(ours, aesthetic_score=s, strength=0.7) for s in (1.0, 9.0))
    assert np.abs(low - high).max() > 1e-4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"denoising_start": 1.5}, "denoising_start must be None or a number in [0, 1]"),
        ({"denoising_start": 0.6, "denoising_end": 0.5}, "must be below denoising_end"),
        ({"strength": 0.1}, "leaves no step to run"),
        ({"image": None}, "image must be a PIL image"),
    ],
)
def test_bad_sdxl_image_argument_raises_value_error_naming_it(parts, kwargs, message):
    pipe = ImageToImageXLPipeline(**parts.as_dict())
    with pytest.raises(ValueError) as error:
        images(pipe, **kwargs)
    assert message in str(error.value)


def refiner_parts(parts) -> dict:
    """SDXL's refiner: no text encoder 1, a U-Net reading encoder 2's states and five time ids."""
    config = dict(parts.unet.config)
    d, te2 = config["addition_time_embed_dim"], parts.text_encoder_2.config
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(
        {
            **config,
            "cross_attention_dim": te2.hidden_size,
            "projection_class_embeddings_input_dim": 5 * d + te2.projection_dim,
        }
    )
    return {**parts.as_dict(), "unet": unet, "text_encoder": None, "tokenizer": None}


def test_a_refiner_with_text_encoder_2_alone_draws_like_diffusers(parts):
    ours, theirs = pair(refiner_parts(parts), requires_aesthetics_score=True)
    assert_same_images(ours, theirs, guidance_scale=5.0, strength=0.6, negative_prompt="blurry")


@pytest.fixture(scope="module")
def refiner_folder(parts, tmp_path_factory):
    pipe = ImageToImageXLPipeline(**refiner_parts(parts), requires_aesthetics_score=True)
    return pipe.save_pretrained(tmp_path_factory.mktemp("refiner"))


@pytest.mark.parametrize("cls", [ImageToImageXLPipeline, InpaintXLPipeline])
def test_a_refiner_folder_loads_with_text_encoder_2_alone_and_draws_as_saved(parts, refiner_folder, cls):
    index = json.loads((refiner_folder / "model_index.json").read_text())
    assert index["text_encoder"] == index["tokenizer"] == [None, None]
    assert index["requires_aesthetics_score"] is True
    assert not (refiner_folder / "text_encoder").exists()
    loaded = cls.from_pretrained(refiner_folder)
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.config.requires_aesthetics_score is True
    saved, _ = pair(refiner_parts(parts), requires_aesthetics_score=True)
    if cls is ImageToImageXLPipeline:
        loaded.set_progress_bar_config(disable=True)
        assert np.abs(images(loaded, strength=0.6) - images(saved, strength=0.6)).max() <= 1e-4


def test_a_refiner_folder_loads_in_diffusers_as_the_refiner(refiner_folder):
    theirs = StableDiffusionXLImg2ImgPipeline.from_pretrained(refiner_folder, local_files_only=True)
    assert theirs.text_encoder is None and theirs.config.requires_aesthetics_score is True


def test_a_refiner_folder_given_to_text_to_image_names_the_pipelines_that_load_it(refiner_folder):
    with pytest.raises(ModelFolderError, match="is an SDXL refiner .* load it with ImageToImageXLPipeline"):
        TextToImageXLPipeline.from_pretrained(refiner_folder)


@pytest.mark.parametrize(
    "make, words",
    [
        (
            lambda p: TextToImageXLPipeline(**refiner_parts(p)),
            "reads 5 time ids but TextToImageXLPipeline makes 6",
        ),
        (
            lambda p: ImageToImageXLPipeline(**refiner_parts(p)),
            "a refiner's (size, crop and aesthetic score)",
        ),
        (lambda p: ImageToImageXLPipeline(**p.as_dict(), requires_aesthetics_score=True), "leave it False"),
    ],
    ids=["refiner-in-text-to-image", "refiner-without-aesthetic-score", "base-with-aesthetic-score"],
)
def test_time_ids_the_unet_does_not_read_are_refused_naming_the_setting(parts, make, words):
    pipe = make(parts)
    image = {"image": picture(), "strength": 0.5} if isinstance(pipe, ImageToImageXLPipeline) else {}
    with pytest.raises(ValueError, match=re.escape(words)):
        pipe(PROMPTS, num_inference_steps=2, output_type="np", **image)


def test_sdlite_generate_redraws_an_image_with_a_refiner_folder(refiner_folder, tmp_path, monkeypatch):
    """The refiner's folder has no text-to-image pipeline: --image loads it straight into the image one."""
    from sdlite.cli import main

    # the command's threads as the test's own (conftest.py): its default, the machine's physical cores,
    # sums in another order, and the images are compared exactly
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("SDLITE_TEST_THREADS", "1"))

    picture(3, size=64).save(tmp_path / "in.png")
    flags = ["--num_inference_steps", "4", "--guidance_scale", "5", "--seed", "0", "--strength", "0.6"]
    argv = ["generate", "a red circle", "--model", str(refiner_folder), "--image", str(tmp_path / "in.png")]
    assert main([*argv, *flags, "--out", str(tmp_path / "out.png")]) == 0
    pipe = ImageToImageXLPipeline.from_pretrained(refiner_folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        "a red circle", image=PIL.Image.open(tmp_path / "in.png").convert("RGB"), strength=0.6,
        num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
    ).images[0]  # fmt: skip
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "out.png")), np.asarray(expected))
