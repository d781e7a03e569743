"""DreamBooth in training/train.py: a subject's photos with a rare-token prompt, class images generated
by the base model when missing, each batch half subject and half class, the prior-preservation loss."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_train import launch

from training.config import parse_config
from training.config.unet import TrainConfig
from training.train import UNetTrainer, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    """Three photos of one subject, in no metadata and with no caption files."""
    folder = tmp_path_factory.mktemp("sks")
    for i in range(3):
        image = Image.new("RGB", (40, 36), (240, 240, 240))
        image.paste((200, 40 * i, 200), (8, 8, 30, 28))
        image.save(folder / f"photo{i}.png")
    return folder


def flags(subject: Path, classes: Path, out: Path, **overrides) -> list[str]:
    values = dict(instance_data_dir=subject, instance_prompt="a photo of sks blob", class_data_dir=classes,
                  class_prompt="a photo of a blob", num_class_images=4, sample_batch_size=3,
                  validation_inference_steps=2, output_dir=out, cache_dir=out.parent / "cache", max_steps=4,
                  train_batch_size=1, learning_rate=1e-3, log_every=1, checkpoint_every=2, ema_decay=0.9,
                  report_to="none", seed=0, random_flip="true")  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def weights(run: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((run / "final" / part).glob("*.safetensors")))


def test_missing_class_images_are_generated_once_by_the_base_model(subject, tmp_path):
    classes = tmp_path / "blobs"
    classes.mkdir()
    Image.new("RGB", (32, 32), (0, 0, 200)).save(classes / "mine.png")  # one class image of the user's
    trainer = UNetTrainer(parse_config(TrainConfig, flags(subject, classes, tmp_path / "run")))
    made = sorted(p.name for p in classes.glob("class_*.png"))
    assert made == ["class_00000.png", "class_00001.png", "class_00002.png"]  # 4 wanted, 1 there
    assert (classes / "class_00002.txt").read_text() == "a photo of a blob\n"
    size = trainer.parts.vae.config.sample_size
    assert Image.open(classes / "class_00000.png").size == (size, size)
    stamps = [p.stat().st_mtime_ns for p in sorted(classes.iterdir())]
    UNetTrainer(parse_config(TrainConfig, flags(subject, classes, tmp_path / "again")))
    assert [p.stat().st_mtime_ns for p in sorted(classes.iterdir())] == stamps  # nothing made again


def test_each_step_weighs_subject_and_class_halves_by_the_prior_loss_weight(subject, tmp_path):
    argv = flags(subject, tmp_path / "blobs", tmp_path / "run", train_batch_size=2, prior_loss_weight=0.5)
    trainer = UNetTrainer(parse_config(TrainConfig, argv))
    assert trainer.global_batch == 2 * 2  # 2 subject photos and 2 class images a step
    rows = trainer.layout.class_rows
    for step in range(3):
        items = trainer.sampler.step_items(step)
        assert [row in rows for row, _ in items] == [False, False, True, True]
    logs, _ = trainer.train_step(0)
    assert torch.allclose(logs["loss"], logs["instance_loss"] + 0.5 * logs["prior_loss"])
    assert logs["instance_loss"] > 0 and logs["prior_loss"] > 0


def test_each_batch_says_which_of_its_images_are_class_images(subject, tmp_path):
    argv = flags(subject, tmp_path / "blobs", tmp_path / "run", train_batch_size=2)
    trainer = UNetTrainer(parse_config(TrainConfig, argv))
    rows = set(trainer.layout.class_rows)
    for step in range(2):
        batch = next(trainer.batches)
        items = trainer.sampler.step_items(step)[trainer.sampler.positions(0)]
        assert batch["is_prior"].tolist() == [row in rows for row, _ in items] == [False, False, True, True]
        assert batch["is_prior"].device.type == "cpu"  # read on the host, not waited for on the device
    trainer.release()


def test_a_dreambooth_run_resumes_exactly(subject, tmp_path, monkeypatch):
    main(flags(subject, tmp_path / "blobs", tmp_path / "whole"))
    step = UNetTrainer.optimizer_step

    def crash(trainer, i):
        if i == 3:
            raise KeyboardInterrupt("the machine went away")
        return step(trainer, i)

    monkeypatch.setattr(UNetTrainer, "optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        main(flags(subject, tmp_path / "blobs", tmp_path / "broken"))
    monkeypatch.undo()
    main(flags(subject, tmp_path / "blobs", tmp_path / "broken", resume="latest"))
    for part in ("unet_raw", "unet"):
        a, b = weights(tmp_path / "whole", part), weights(tmp_path / "broken", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def wide_subject(subject: Path, folder: Path) -> Path:
    """The subject's photos and a panorama: at resolution 64 and bucket_step 32, buckets 64x64 (3 photos)
    and 96x32 (1)."""
    folder.mkdir()
    for photo in subject.iterdir():
        (folder / photo.name).write_bytes(photo.read_bytes())
    Image.new("RGB", (120, 36), (200, 0, 200)).save(folder / "panorama.png")
    return folder


def test_class_images_are_generated_in_the_subject_photos_bucket_shapes(subject, tmp_path):
    wide = wide_subject(subject, tmp_path / "wide")
    # bucket_step 32, not the default: the class images must be made in the buckets of the setting
    argv = flags(wide, tmp_path / "blobs", tmp_path / "run", resolution=64, aspect_buckets="true",
                 bucket_step=32)  # fmt: skip
    trainer = UNetTrainer(parse_config(TrainConfig, argv))
    sizes = sorted(Image.open(p).size for p in (tmp_path / "blobs").glob("*.png"))
    assert sizes == [(64, 64)] * 3 + [(96, 32)]  # num_class_images 4 in the subject's 3:1
    buckets = trainer.layout.transform.buckets
    class_shapes = {buckets[trainer.layout.bucket_of_rows[r]] for r in trainer.layout.class_rows}
    assert class_shapes == {(64, 64), (96, 32)}  # each step's class half from its own bucket
    logs, _ = trainer.train_step(0)
    assert logs["prior_loss"] > 0


def test_a_bucket_of_subject_photos_without_class_images_is_named_before_training(subject, tmp_path):
    blobs = tmp_path / "blobs"  # a full class folder of squares (from a run without buckets): none made
    blobs.mkdir()
    for i in range(4):
        Image.new("RGB", (32, 32), (0, 0, 200)).save(blobs / f"{i}.png")
    argv = flags(wide_subject(subject, tmp_path / "wide"), blobs, tmp_path / "run", resolution=64,
                 aspect_buckets="true", bucket_step=32)  # fmt: skip
    with pytest.raises(ValueError, match=r"aspect buckets 96x32 hold subject photos but no class image"):
        UNetTrainer(parse_config(TrainConfig, argv))


def test_two_processes_train_dreambooth_like_one(subject, tmp_path):
    """Each process takes its share of the step's subject photos and as many class images; the step's
    random draws follow the items, so 2 x 1 is the training of 1 x 2 (up to float32 summation order)."""
    options = dict(max_steps=2, checkpoint_every=0, train_batch_size=2)
    main(flags(subject, tmp_path / "blobs", tmp_path / "one", **options))
    argv = flags(subject, tmp_path / "blobs", tmp_path / "two", **dict(options, train_batch_size=1))
    log = launch(["--multi_gpu", "--num_processes", "2"], argv)
    assert "global batch 4" in log  # 2 subject photos + 2 class images a step
    a, b = weights(tmp_path / "one", "unet_raw"), weights(tmp_path / "two", "unet_raw")
    difference = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert difference.mean() < 1e-6 and (difference > 1e-5).float().mean() < 1e-3


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(instance_data_dir="none"), "class_data_dir without instance_data_dir"),
        (dict(class_prompt=""), "class_data_dir without class_prompt"),
        (dict(instance_prompt=" "), "instance_data_dir without instance_prompt"),
        (dict(streaming="true"), "DreamBooth"),
    ],
)
def test_dreambooth_settings_that_cannot_work_fail_before_training(subject, tmp_path, setting, words):
    with pytest.raises(ValueError, match=words):
        main(flags(subject, tmp_path / "blobs", tmp_path / "run", **setting))
    assert not (tmp_path / "blobs").exists()  # nothing generated
