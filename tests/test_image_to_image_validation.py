"""A training run's image-to-image validation sample (validation_image, validation_strength): drawn by
the model's image-to-image pipeline beside the prompts' images, and its keys checked before the run."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import ImageToImagePipeline
from sdlite.data.shapes import write_dataset
from training import validation
from training.config import from_dict
from training.config.unet import TrainConfig
from training.train import main


def flags(**values) -> list[str]:
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def test_a_run_redraws_the_validation_image_with_the_models_image_to_image_pipeline(tmp_path, monkeypatch):
    data = write_dataset(tmp_path / "shapes", count=4, seed=0)
    start = tmp_path / "start.png"
    Image.open(next(data.glob("*.png"))).resize((48, 40)).save(start)  # resized to the model's 32 x 32
    logged = []
    monkeypatch.setattr(validation, "log_image", lambda acc, tag, image, step: logged.append((tag, step)))
    out = tmp_path / "run"
    run = dict(train_data_dir=data, output_dir=out, cache_dir=tmp_path / "cache", max_steps=1, seed=3,
               train_batch_size=2, checkpoint_every=0, report_to="none", ema_decay="none")  # fmt: skip
    main(flags(**run, validation_prompts="a green square", validation_image=start, validation_strength=0.5,
               validation_inference_steps=4, validation_guidance=3.0))  # fmt: skip
    drawn = np.asarray(Image.open(out / "validation" / "step-1-image.png"), dtype=np.float32)
    assert ("validation/image", 1) in logged and (out / "validation" / "step-1" / "00.png").is_file()

    pipe = ImageToImagePipeline.from_pretrained(out / "final")  # the weights the validation drew with
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(start).convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
    kw = dict(image=image, num_inference_steps=4, guidance_scale=3.0, output_type="np")
    expected = pipe(["a green square"], negative_prompt=[""], strength=0.5, **kw, generator=seed(3)).images[0]
    assert drawn.shape == (32, 32, 3)
    assert np.abs(drawn - np.round(expected * 255)).max() <= 1  # the same call, saved as PNG
    other = pipe(["a green square"], negative_prompt=[""], strength=1.0, **kw, generator=seed(3)).images[0]
    assert np.abs(drawn - np.round(other * 255)).max() > 1  # validation_strength counted


def seed(n: int) -> torch.Generator:
    return torch.Generator().manual_seed(n)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.new("RGB", (32, 32), (255, 255, 255)).save(path)
    return path


IMAGE = {"validation_image": "{image}"}


@pytest.mark.parametrize(
    "keys, words",
    [
        ({"validation_image": "missing.png"}, "validation_image='missing.png': no such file"),
        ({"validation_image": "{not_image}"}, "is not an image PIL reads"),
        ({**IMAGE, "validation_prompts": []}, "validation_image needs a prompt"),
        ({**IMAGE, "validation_strength": 0.0}, "validation_strength=0.0: use a number in (0, 1]"),
        ({**IMAGE, "validation_strength": 1.5}, "validation_strength=1.5: use a number in (0, 1]"),
        ({**IMAGE, "validation_strength": 0.1, "validation_inference_steps": 5}, "runs no step"),
    ],
)  # fmt: skip
def test_a_bad_validation_image_key_is_one_line_naming_it(tmp_path, image, keys, words):
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    values = {"validation_prompts": ["a red circle"]}
    values |= {
        k: v.format(image=image, not_image=not_image) if isinstance(v, str) else v for k, v in keys.items()
    }
    problems = [p for p in from_dict(TrainConfig, values).problems() if "validation" in p]
    assert len(problems) == 1 and words in problems[0]


def test_the_default_strength_checks_nothing_without_a_validation_image():
    values = {"validation_prompts": ["a red circle"], "validation_inference_steps": 1}
    assert not [p for p in from_dict(TrainConfig, values).problems() if "validation" in p]


def test_a_missing_validation_image_fails_the_run_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="validation_image='nowhere.png': no such file"):
        main(flags(validation_prompts="a red circle", validation_image="nowhere.png", output_dir=out,
                   train_data_dir=tmp_path))  # fmt: skip
    assert not out.exists()
