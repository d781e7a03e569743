"""training/train.py on photo sets as sd-scripts users keep them: caption files beside the images,
N_name repeat folders, caption_prefix / shuffle_caption / keep_tokens, and aspect-ratio buckets.

Each run is the tiny preset for a few steps on a handful of images; resolution 64 with bucket_step 32
gives the tiny VAE (factor 4) the buckets 32x128, 32x96, 64x64, 96x32, 128x32 (the tests written when
that grid was the only one pin it; the default step, the VAE factor, is tested on the issue's photos).
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_train import launch as launch_with
from test_train import run_killed_at

from training.config import parse_config
from training.config.unet import TrainConfig
from training.train import UNetTrainer, main

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}


def picture(path: Path, size: tuple[int, int], color: str, shape: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (240, 240, 240))
    w, h = size
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)(
        [w // 4, h // 4, 3 * w // 4, 3 * h // 4], COLORS[color]
    )
    image.save(path)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """2_subject: 3 images repeated twice; 1_other: 3 once (one without a caption file); an orphan .txt.
    Sizes in 3 aspect buckets at resolution 64: 64x64 (3 images), 96x32 (2), 32x96 (1)."""
    root = tmp_path_factory.mktemp("photos")
    for name, size, color, shape in [
        ("2_subject/a.png", (64, 64), "red", "circle"),
        ("2_subject/b.png", (150, 50), "blue", "square"),
        ("2_subject/c.jpg", (40, 120), "green", "circle"),
        ("1_other/d.png", (70, 60), "red", "square"),
        ("1_other/e.png", (99, 30), "green", "square"),
        ("1_other/f.png", (64, 70), "blue", "circle"),
    ]:
        path = picture(root / name, size, color, shape)
        if path.stem != "f":
            path.with_suffix(".txt").write_text(
                f"{color}, {shape}, {'wide' if size[0] > size[1] else 'tall'}\n"
            )
    (root / "1_other" / "orphan.txt").write_text("a caption whose image was deleted")
    return root


def flags(data: Path, cache: Path, out: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=cache, max_steps=4, train_batch_size=2,
                  learning_rate=1e-3, log_every=1, checkpoint_every=2, ema_decay=0.9, report_to="none",
                  seed=0, random_flip="true")  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def weights(run: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((run / "final" / part).glob("*.safetensors")))


def resumes_exactly(argv, out: Path, monkeypatch, crash_at: int = 3) -> None:
    """A run stopped at step ``crash_at`` and resumed from its last checkpoint ends with the weights of
    the uninterrupted run already in ``out / "whole"``."""
    run_killed_at(monkeypatch, crash_at, lambda: main(argv(out / "broken")))
    main(argv(out / "broken") + ["--resume", "latest"])
    for part in ("unet_raw", "unet"):
        a, b = weights(out / "whole", part), weights(out / "broken", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


CAPTIONS = dict(shuffle_caption="true", keep_tokens=1, caption_prefix="sks")


def test_a_caption_folder_trains_with_repeats_prefix_and_shuffled_tags_and_resumes_exactly(
    photos, cache, tmp_path, monkeypatch
):
    def argv(out):
        return flags(photos, cache, out, **CAPTIONS)

    main(argv(tmp_path / "whole"))
    report = (tmp_path / "whole" / "bad_files.txt").read_text()
    assert "orphan.txt\tcaption file without an image of the same name\tignored" in report
    assert "f.png\tno caption file (.txt or .caption)\tkept, trained with the empty caption" in report
    resumes_exactly(argv, tmp_path, monkeypatch)


def test_repeats_and_drawn_captions_reach_the_batches(photos, cache, tmp_path):
    trainer = UNetTrainer(parse_config(TrainConfig, flags(photos, cache, tmp_path, max_steps=15, **CAPTIONS)))
    sampler, tokenizer = trainer.sampler, trainer.parts.tokenizer
    assert sampler.num_items == 3 * 2 + 3  # 2_subject twice, 1_other once
    seen = {}
    for step in range(3 * sampler.steps_per_epoch):  # three epochs
        batch = next(trainer.batches)
        assert "embeds" not in batch  # a caption drawn anew at each draw cannot come from the text cache
        for (row, *_), ids in zip(sampler.step_items(step), batch["input_ids"]):
            text = tokenizer.decode(ids, skip_special_tokens=True).replace(
                " ,", ","
            )  # the tiny tokenizer spaces "," out
            seen.setdefault(row, []).append(text)
    # each row at least its repeats per epoch; an epoch's last short step is filled by repeating items
    drawn = sorted(len(texts) for texts in seen.values())
    assert drawn[:3] >= [3] * 3 and drawn[3:] >= [6] * 3 and sum(drawn) == 3 * 5 * 2
    captions = {text for texts in seen.values() for text in texts}
    assert all(text == "sks" or text.startswith("sks, ") for text in captions)  # the trigger word first
    # keep_tokens=1: the colour (the caption's own first tag) stays right after the trigger word
    assert all(text == "sks" or text.split(", ")[1] in COLORS for text in captions)
    assert all(len(set(texts)) == 2 for texts in seen.values() if texts[0] != "sks")  # both tag orders


def test_tag_dropout_reaches_the_batches_keeping_the_first_tags(photos, cache, tmp_path):
    flags_ = flags(photos, cache, tmp_path, max_steps=15, keep_tokens=1, caption_tag_dropout_rate=0.5)
    trainer = UNetTrainer(parse_config(TrainConfig, flags_))
    tokenizer, texts = trainer.parts.tokenizer, []
    for _ in range(2 * trainer.sampler.steps_per_epoch):
        batch = next(trainer.batches)
        assert "embeds" not in batch
        texts += [
            tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") for ids in batch["input_ids"]
        ]
    tags = [text.split(", ") for text in texts if text]  # f.png has no caption
    assert all(t[0] in COLORS for t in tags)  # keep_tokens=1: the colour stays
    assert {len(t) for t in tags} == {1, 2, 3}  # neither, one or both of shape and width left out


def test_aspect_buckets_write_their_counts_cache_latents_and_resume_exactly(
    photos, cache, tmp_path, monkeypatch
):
    def argv(out):
        return flags(
            photos, cache, out, resolution=64, aspect_buckets="true", random_crop="true", bucket_step=32
        )

    main(argv(tmp_path / "whole"))
    counts = json.loads((tmp_path / "whole" / "buckets.json").read_text())
    assert counts == {"32x96": 1, "64x64": 3, "96x32": 2}
    resumes_exactly(argv, tmp_path, monkeypatch)


def test_buckets_trained_without_the_latent_cache_are_the_same_training(photos, cache, tmp_path):
    options = dict(resolution=64, aspect_buckets="true", bucket_step=32, max_steps=2, checkpoint_every=0)
    main(flags(photos, cache, tmp_path / "cached", **options))
    main(flags(photos, tmp_path / "unused", tmp_path / "uncached", cache_latents="false", **options))
    a, b = weights(tmp_path / "cached", "unet_raw"), weights(tmp_path / "uncached", "unet_raw")
    difference = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert difference.mean() < 1e-6 and (difference > 1e-5).float().mean() < 1e-3


def test_every_step_draws_one_bucket_with_latents_of_its_size(photos, cache, tmp_path):
    options = dict(resolution=64, aspect_buckets="true", bucket_step=32, max_steps=10)
    cfg = parse_config(TrainConfig, flags(photos, cache, tmp_path, **options))
    trainer = UNetTrainer(cfg)
    shapes = set()
    for step in range(trainer.sampler.steps_per_epoch):
        batch = next(trainer.batches)
        shape = trainer.data.step_latent_shape(step)
        assert batch["mean"].shape[1:] == shape  # the cache's latents, the step's noise: one size
        shapes.add(shape)
    assert shapes == {(4, 16, 16), (4, 8, 24), (4, 24, 8)}


def launch(args: list[str]) -> str:
    return launch_with(["--multi_gpu", "--num_processes", "2"], args)


def test_two_processes_train_buckets_and_captions_like_one(photos, cache, tmp_path):
    """Each process takes its half of every step's bucket: 2 x 1 is the training of 1 x 2."""
    options = dict(
        resolution=64, aspect_buckets="true", bucket_step=32, max_steps=3, checkpoint_every=0, **CAPTIONS
    )
    main(flags(photos, cache, tmp_path / "one", **options))
    log = launch(flags(photos, cache, tmp_path / "two", train_batch_size=1, **options))
    assert "global batch 2" in log and "aspect buckets: 6 images in 3 buckets" in log
    a, b = weights(tmp_path / "one", "unet_raw"), weights(tmp_path / "two", "unet_raw")
    difference = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    # the same training up to float32 summation order (tests/test_train.py says how close that is)
    assert difference.mean() < 1e-6 and (difference > 1e-5).float().mean() < 1e-3


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(streaming="true", aspect_buckets="true"), "not with streaming"),
        (dict(keep_tokens=-1), "keep_tokens"),
        (dict(aspect_buckets="true", bucket_step=6), "bucket_step 6 is not a multiple of 4, the VAE factor"),
        (dict(bucket_step=0), "bucket_step=0: use a whole number >= 1"),
        (
            dict(
                aspect_buckets="true",
                bucket_no_upscale="true",
                instance_data_dir="a",
                instance_prompt="sks",
                class_data_dir="b",
                class_prompt="a dog",
            ),
            "bucket_no_upscale with class_data_dir",
        ),
        (dict(caption_tag_dropout_rate=1.0), "caption_tag_dropout_rate=1.0 must be in"),
        (
            dict(streaming="true", caption_tag_dropout_rate=0.1),
            "caption_tag_dropout_rate .*not with streaming",
        ),
    ],
)
def test_photo_set_settings_that_cannot_work_fail_before_training(photos, tmp_path, setting, words):
    with pytest.raises(ValueError, match=words):
        main(flags(photos, tmp_path / "cache", tmp_path / "run", **setting))


@pytest.fixture(scope="module")
def three_by_two(tmp_path_factory) -> Path:
    """The issue's photos: 48x32 and 32x48 images in a kohya folder, for the tiny (32-pixel) model."""
    root = tmp_path_factory.mktemp("three_by_two")
    for i, (size, shape) in enumerate([((48, 32), "circle"), ((32, 48), "square")] * 2):
        picture(root / "10_mysubject" / f"{i}.png", size, "red", shape).with_suffix(".txt").write_text(
            f"mysubject, red {shape}"
        )
    return root


@pytest.mark.parametrize(
    "setting, counts",
    [({}, {"24x40": 2, "40x24": 2}), ({"bucket_no_upscale": "true"}, {"24x36": 2, "36x24": 2})],
)
def test_3_by_2_photos_train_in_non_square_buckets_on_the_32_pixel_model(
    three_by_two, cache, tmp_path, capsys, setting, counts
):
    # By default bucket sides step by the VAE factor (4): 40x24 is about 32x32 pixels at the photos'
    # shape. With no upscaling each photo is scaled down to 32x32 pixels, sides rounded down to a step.
    options = dict(aspect_buckets="true", max_steps=2, checkpoint_every=0, **setting)
    main(flags(three_by_two, cache, tmp_path, **options))
    assert json.loads((tmp_path / "buckets.json").read_text()) == counts
    assert "fell into one bucket" not in capsys.readouterr().out
    assert weights(tmp_path, "unet")


def test_all_photos_in_one_square_bucket_warn_naming_the_step(three_by_two, cache, tmp_path, capsys):
    main(flags(three_by_two, cache, tmp_path, aspect_buckets="true", bucket_step=32, max_steps=1))
    assert json.loads((tmp_path / "buckets.json").read_text()) == {"32x32": 4}
    out = capsys.readouterr().out
    assert "warning: aspect buckets: all 4 images fell into one bucket, 32x32" in out
    assert "a smaller bucket_step (this model takes multiples of 4)" in out
