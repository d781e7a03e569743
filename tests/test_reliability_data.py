"""Scraped data: bad images and captions are handled or skipped before step 0, never mid-epoch.

The messy folder holds 8 good shapes images and one of each problem the issue lists: a corrupt file,
a truncated PNG, a text file named .png, a grayscale, an RGBA, a 16-bit and a too-small image, a row
without a caption, an empty caption and one longer than the tokenizer's limit.
"""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sdlite.data import cleaning
from sdlite.data.cache import DecodedImages
from sdlite.data.cleaning import clean_rows
from sdlite.data.dataset import DataError, ImageTransform, load_rows
from sdlite.data.decoding import decode_image
from sdlite.data.shapes import write_dataset
from sdlite.tokenizer import clip_tokenizer
from training.train import main

UNREADABLE = {"corrupt.png", "truncated.png", "notes.png"}
CONVERTED = {"gray.png", "rgba.png", "deep.png", "small.png"}


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("messy"), count=8, seed=0)
    rng = np.random.default_rng(0)
    good = (root / "000000.png").read_bytes()
    files = {
        "corrupt.png": good[:40] + rng.integers(0, 256, 400, dtype=np.uint8).tobytes(),
        "truncated.png": good[: len(good) // 2],
        "notes.png": b"these are my notes, not an image\n",
        "gray.png": png(rng.integers(0, 256, (32, 32), dtype=np.uint8)),
        "rgba.png": png(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)),
        "deep.png": png(rng.integers(0, 65536, (32, 32), dtype=np.uint16)),
        "small.png": png(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)),
        "uncaptioned.png": good,
        "empty.png": good,
        "wordy.png": good,
    }
    captions = {"uncaptioned.png": None, "empty.png": "", "wordy.png": "a red circle " * 40}
    lines = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        lines.append(json.dumps({"file_name": name, "text": captions.get(name, "a thing")}))
    with open(root / "metadata.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")
    return root


def test_unreadable_images_are_skipped_others_converted_and_every_row_listed(messy, tmp_path):
    rows = load_rows(messy)
    logs = []
    report = tmp_path / "bad.txt"
    kept = clean_rows(rows, "image", "text", 32, clip_tokenizer(77), "skip", report, logs.append)
    assert len(rows) == 18 and len(kept) == 15
    assert not {p.split("/")[-1] for p in (e["path"] for e in kept["image"])} & UNREADABLE
    lines = [line.split("\t") for line in report.read_text().splitlines()]
    listed = {name.split("/")[-1]: (problem, action) for name, problem, action in lines}
    assert {n for n, (_, a) in listed.items() if a == "skipped"} == UNREADABLE
    assert {n for n, (_, a) in listed.items() if a == "kept"} == CONVERTED
    assert "upscaled from 7x5" in listed["small.png"][0] and "I;16" in listed["deep.png"][0]
    assert listed["uncaptioned.png"][0] == listed["empty.png"][0] == "no caption"
    assert listed["wordy.png"] == ("caption longer than 77 tokens", "kept, truncated")
    # one log line counts each kind
    assert len(logs) == 1 and "3 unusable images (skipped)" in logs[0] and "4 images converted" in logs[0]
    assert "2 rows without a caption" in logs[0] and "1 captions truncated" in logs[0]
    # every kept image now decodes to the transform's shape
    transform = ImageTransform(32)
    for i, entry in enumerate(kept["image"]):
        assert transform(open(entry["path"], "rb").read(), i).shape == (3, 32, 32)


def test_bad_data_error_stops_before_training_naming_the_files(messy, tmp_path):
    with pytest.raises(DataError, match="3 rows have unusable images") as error:
        clean_rows(load_rows(messy), "image", "text", 32, None, "error", tmp_path / "bad.txt", print)
    assert all(name in str(error.value) for name in UNREADABLE)
    assert (tmp_path / "bad.txt").is_file()


def test_a_folder_of_only_bad_images_is_an_error_and_a_clean_one_leaves_no_list(messy, tmp_path):
    only_bad = load_rows(messy).filter(lambda r: r["image"]["path"].split("/")[-1] in UNREADABLE)
    with pytest.raises(DataError, match="none of the 3 rows"):
        clean_rows(only_bad, "image", "text", 32, None, "skip", None, print)
    (tmp_path / "bad.txt").write_text("stale\n")
    clean = load_rows(messy).select(range(8))
    assert len(clean_rows(clean, "image", "text", 32, None, "skip", tmp_path / "bad.txt", print)) == 8
    assert not (tmp_path / "bad.txt").exists()


def test_images_that_decoded_in_an_earlier_run_are_not_decoded_again(messy, tmp_path, monkeypatch):
    real, calls = cleaning.decode_image, []
    monkeypatch.setattr(
        cleaning, "decode_image", lambda data, *limit: calls.append(data) or real(data, *limit)
    )
    rows, decoded = load_rows(messy), DecodedImages(tmp_path)
    first = clean_rows(rows, "image", "text", 32, None, "skip", None, print, decoded)
    assert len(calls) >= 10
    calls.clear()
    second = clean_rows(rows, "image", "text", 32, None, "skip", None, print, decoded)
    assert len(first) == len(second) == 15
    assert calls == [(messy / "truncated.png").read_bytes()]  # only the bad image that opens, again


def test_gray_transparent_and_16_bit_images_decode_to_the_rgb_they_show():
    deep = np.array([[0, 65535], [32896, 257]], dtype=np.uint16)
    assert np.asarray(decode_image(png(deep))).tolist() == [[[0] * 3, [255] * 3], [[128] * 3, [1] * 3]]
    rgba = np.array([[[0, 0, 0, 0], [10, 20, 30, 255]]], dtype=np.uint8)  # transparent black, opaque
    assert np.asarray(decode_image(png(rgba))).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    gray = np.array([[7, 200]], dtype=np.uint8)
    assert np.asarray(decode_image(png(gray))).tolist() == [[[7] * 3, [200] * 3]]
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with pytest.raises(OSError, match="truncated"):
        decode_image(png(noise)[:1500])  # the header reads; the pixels fail here, not in the loop


def argv(values: dict) -> list[str]:
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


@pytest.mark.parametrize("cached", ["true", "false"])
def test_training_on_a_messy_folder_runs_and_writes_bad_files(messy, tmp_path, cached):
    out = tmp_path / "run"
    flags = dict(train_data_dir=messy, output_dir=out, cache_dir=tmp_path / "cache", max_steps=4,
                 train_batch_size=5, checkpoint_every=0, report_to="none", ema_decay="none",
                 cache_latents=cached, log_every=2)  # fmt: skip
    # 15 usable rows x 4 steps of 5 (uncached: every row decoded in the loop, none may fail there)
    main(argv(flags))
    assert (out / "final" / "unet").is_dir()
    skipped = [line for line in (out / "bad_files.txt").read_text().splitlines() if line.endswith("skipped")]
    assert len(skipped) == 3
    with pytest.raises(DataError, match="unusable images"):
        main(argv({**flags, "bad_data": "error"}))


def test_an_image_that_breaks_after_the_check_does_not_end_an_uncached_run(
    messy, tmp_path, monkeypatch, capfd
):
    # Issue 15, item 7: the file changes between the start-up check and its turn in the loop. Before,
    # PIL.UnidentifiedImageError (naming no file) ended the run without a checkpoint.
    import training.examples as parts

    folder = tmp_path / "data"
    shutil.copytree(messy, folder)
    checked = parts.clean_rows

    def check_then_break(*args, **kwargs):
        rows = checked(*args, **kwargs)
        (folder / "000003.png").write_bytes(b"overwritten after the check\n")
        return rows

    monkeypatch.setattr(parts, "clean_rows", check_then_break)
    out = tmp_path / "run"
    main(argv(dict(train_data_dir=folder, output_dir=out, max_steps=3, train_batch_size=5, checkpoint_every=0,
                   report_to="none", ema_decay="none", cache_latents="false")))  # fmt: skip
    assert (out / "final" / "unet").is_dir()
    assert "000003.png: not an image" in capfd.readouterr().out
