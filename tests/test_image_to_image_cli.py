"""``sdlite generate --image IN.png [--strength S] [--mask MASK.png]``: image to image and inpainting."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import ImageToImagePipeline, InpaintPipeline
from sdlite.cli import main
from sdlite.models import build_components, save_components


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("SDLITE_TEST_THREADS", "1"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_components(build_components("tiny", seed=0), tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:20, 8:24] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    (folder / "notes.png").write_text("not a picture")
    return folder


def generate(model, out, *flags) -> np.ndarray:
    argv = [
        "generate",
        "a red circle",
        "--model",
        str(model),
        "--steps",
        "4",
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    assert main([*argv, *flags]) == 0
    return np.asarray(Image.open(out))


def library(cls, model, **kwargs) -> np.ndarray:
    pipe = cls.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    kwargs |= dict(num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))
    return np.asarray(pipe("a red circle", **kwargs).images[0])


def test_generate_from_an_image_draws_what_the_pipeline_draws(model, pictures, tmp_path):
    out = generate(model, tmp_path / "out.png", "--image", str(pictures / "in.png"), "--strength", "0.5")
    assert out.shape == (40, 40, 3)  # the picture's size
    image = Image.open(pictures / "in.png").convert("RGB")
    assert np.array_equal(out, library(ImageToImagePipeline, model, image=image, strength=0.5))
    other = generate(model, tmp_path / "other.png", "--image", str(pictures / "in.png"), "--strength", "1")
    assert not np.array_equal(out, other)


def test_generate_with_a_mask_inpaints_what_the_pipeline_paints(model, pictures, tmp_path):
    flags = ["--image", str(pictures / "in.png"), "--mask", str(pictures / "mask.png")]
    out = generate(model, tmp_path / "out.png", *flags)
    assert out.shape == (32, 32, 3)  # the model's size, as inpainting defaults to
    image, mask = (Image.open(pictures / n).convert("RGB") for n in ("in.png", "mask.png"))
    assert np.array_equal(out, library(InpaintPipeline, model, image=image, mask_image=mask))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--strength", "0.5"], "--strength goes with --image"),
        (["--mask", "m.png"], "--mask goes with --image"),
    ],
)
def test_image_flags_without_an_image_are_a_usage_error(model, flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["generate", "x", "--model", str(model), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--image", "{p}/notes.png"], "--image '{p}/notes.png' is not a picture"),
        (["--image", "{p}/in.png", "--strength", "1.5"], "strength must be a number in [0, 1]"),
        (["--image", "{p}/in.png", "--height", "64"], "image to image keeps --image's size"),
    ],
)
def test_bad_image_flags_fail_in_one_line_writing_nothing(model, pictures, tmp_path, flags, message, capsys):
    flags = [f.format(p=pictures) for f in flags]
    argv = ["generate", "x", "--model", str(model), "--steps", "1", "--out", str(tmp_path / "x.png")]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err
    assert message.format(p=pictures) in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_the_image_pipelines_of_a_loaded_model_are_those_of_its_family():
    from pipelines import (
        ImageToImagePipeline,
        ImageToImageXLPipeline,
        InpaintPipeline,
        InpaintXLPipeline,
        TextToImagePipeline,
        TextToImageXLPipeline,
    )
    from sdlite.models import build_components
    from sdlite.models_xl import build_components_xl
    from training.cmd_generate import image_pipeline

    sd = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    xl = TextToImageXLPipeline(**build_components_xl("tiny-sdxl", seed=0).as_dict())
    assert type(image_pipeline(sd, inpaint=False)) is ImageToImagePipeline
    assert type(image_pipeline(sd, inpaint=True)) is InpaintPipeline
    assert type(image_pipeline(xl, inpaint=False)) is ImageToImageXLPipeline
    assert type(image_pipeline(xl, inpaint=True)) is InpaintXLPipeline
