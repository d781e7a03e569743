"""kohya's dataset config (``--dataset_config FILE.toml``) read as sdlite's settings
(training/kohya_dataset.py), what sdlite lacks refused naming the key."""

from pathlib import Path

import pytest
from PIL import Image

from training.config import parse_config
from training.config.unet import TrainConfig


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dataset.toml"
    path.write_text(text)
    return str(path)


def test_one_subset_of_captioned_images_is_the_training_data(tmp_path):
    path = toml(tmp_path, """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 4
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024
bucket_reso_steps = 64
bucket_no_upscale = true

  [[datasets.subsets]]
  image_dir = "photos"
  num_repeats = 10
""")  # fmt: skip
    cfg = parse_config(TrainConfig, ["--dataset_config", path])
    assert (cfg.data.train_data_dir, cfg.data.resolution, cfg.optimizer.train_batch_size) == (
        "photos",
        512,
        4,
    )
    assert (cfg.captions.aspect_buckets, cfg.captions.bucket_min_side, cfg.captions.bucket_max_side) == (
        True,
        256,
        1024,
    )
    assert (cfg.captions.bucket_step, cfg.captions.bucket_no_upscale) == (64, True)
    assert (cfg.captions.shuffle_caption, cfg.captions.keep_tokens) == (True, 1)
    flagged = parse_config(TrainConfig, ["--dataset_config", path, "--train_batch_size", "2"])
    assert flagged.optimizer.train_batch_size == 2  # a flag of the command line wins over the file


def test_a_dreambooth_subset_and_an_is_reg_subset_are_subject_and_class_images(tmp_path):
    path = toml(tmp_path, """
[[datasets]]
resolution = [64, 64]

  [[datasets.subsets]]
  image_dir = "mystar"
  class_tokens = "mystar star"

  [[datasets.subsets]]
  is_reg = true
  image_dir = "stars"
  class_tokens = "star"
""")  # fmt: skip
    cfg = parse_config(TrainConfig, ["--dataset_config", path])
    assert (cfg.dreambooth.instance_data_dir, cfg.dreambooth.instance_prompt) == ("mystar", "mystar star")
    assert (cfg.dreambooth.class_data_dir, cfg.dreambooth.class_prompt, cfg.data.resolution) == (
        "stars",
        "star",
        64,
    )


def test_num_repeats_of_the_subset_counts_in_epochs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(photos / f"{i}.png")
    path = toml(tmp_path, f'[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir = "{photos}"\n'
                          "num_repeats = 4\n")  # fmt: skip
    cfg = parse_config(TrainConfig, ["--dataset_config", path, "--max_train_epochs", "2"])
    assert cfg.optimizer.max_steps == 2 * 6  # 3 images x 4 repeats, 2 a batch


ONE = '[[datasets.subsets]]\nimage_dir = "a"\n'


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (f'[[datasets]]\ncolor_aug = true\n{ONE}', "'color_aug' is not supported"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nimage_dir = "b"\n',
         "one subset of images"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets]]\n', "one [[datasets]], not 2"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\nmetadata_file = "m.json"\n',
         "'metadata_file' is not supported"),
        ('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "a"\n[[datasets.subsets]]\nis_reg = true\n'
         'image_dir = "r"\n', "is_reg subset is DreamBooth's class images"),
        ("[[datasets]\n", "is not TOML"),
    ],
)  # fmt: skip
def test_what_sdlite_has_not_is_refused_naming_the_key(text, says, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--dataset_config", toml(tmp_path, text)])
    assert says in capsys.readouterr().err


def test_a_missing_dataset_config_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--dataset_config", str(tmp_path / "none.toml")])
    assert "none.toml' cannot be read" in capsys.readouterr().err


def test_a_subset_with_class_tokens_and_caption_files_reads_the_captions(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (8, 8)).save(photos / "0.png")
    (photos / "0.txt").write_text("mystar, orange")  # sd-scripts reads it rather than class_tokens
    path = toml(
        tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{photos}"\nclass_tokens = "mystar"\n'
    )
    cfg = parse_config(TrainConfig, ["--dataset_config", path])
    assert cfg.data.train_data_dir == str(photos) and cfg.dreambooth.instance_data_dir is None
