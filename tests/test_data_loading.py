import io
import json
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.data import dataset
from sdlite.data.cache import TensorCache
from sdlite.data.dataset import (
    DataError,
    ImageTransform,
    TrainingExamples,
    caption_text,
    image_bytes,
    load_rows,
)
from sdlite.data.shards import ShardIndex


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Four 8x6 images with metadata.jsonl captions."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).save(root / f"{i:04d}.png")
        lines.append(json.dumps({"file_name": f"{i:04d}.png", "text": f"caption {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_an_image_folder_with_metadata_jsonl_gives_undecoded_images_and_captions(folder):
    rows = load_rows(folder)
    assert len(rows) == 4 and sorted(rows["text"]) == [f"caption {i}" for i in range(4)]
    entry = rows[0]["image"]
    assert image_bytes(entry) == (folder / rows[0]["image"]["path"].split("/")[-1]).read_bytes()


def test_a_saved_dataset_and_tables_of_paths_read_the_same_rows(folder, tmp_path):
    expected = {(image_bytes(r["image"]), r["text"]) for r in load_rows(folder)}
    # save_to_disk, with the image bytes stored in the dataset and other column names
    saved = datasets.Dataset.from_dict(
        {
            "picture": [{"bytes": b, "path": None} for b, _ in sorted(expected)],
            "caption": [t for _, t in sorted(expected)],
        },
        features=datasets.Features({"picture": datasets.Image(), "caption": datasets.Value("string")}),
    )
    saved.save_to_disk(tmp_path / "saved")
    rows = load_rows(tmp_path / "saved", image_column="picture", caption_column="caption")
    assert {(image_bytes(r["picture"]), r["caption"]) for r in rows} == expected
    # CSV and parquet with paths relative to the table's folder; this table's images lie outside its
    # folder, which the user allows (by default a table reads only inside its folder)
    table = tmp_path / "tables"
    table.mkdir()
    relative = os.path.relpath(folder, table)
    lines = ["file,text"] + [f"{relative}/{i:04d}.png,caption {i}" for i in range(4)]
    (table / "data.csv").write_text("\n".join(lines) + "\n")
    rows = load_rows(table / "data.csv", image_column="file", allow_outside=True)
    assert {(image_bytes(r["file"]), r["text"]) for r in rows} == expected
    datasets.load_dataset("csv", data_files=str(table / "data.csv"), split="train").to_parquet(
        table / "d.parquet"
    )
    rows = load_rows(table / "d.parquet", image_column="file", allow_outside=True)
    assert {(image_bytes(r["file"]), r["text"]) for r in rows} == expected
    for name in ("data.csv", "d.parquet"):
        with pytest.raises(DataError, match="outside the data folder.*allow_outside_paths"):
            load_rows(table / name, image_column="file")


def test_a_missing_column_or_source_fails_with_a_useful_message(folder, tmp_path):
    with pytest.raises(DataError, match=r"no caption column 'prompt'.*\['image', 'text'\]"):
        load_rows(folder, caption_column="prompt")
    with pytest.raises(DataError, match="neither a folder"):
        load_rows(tmp_path / "nothing.txt")


def test_captions_may_be_lists_or_missing():
    assert caption_text(["first", "second"]) == "first"
    assert caption_text(None) == "" and caption_text("a") == "a"


def test_centre_crop_resizes_the_short_side_and_crops_the_middle():
    array = np.zeros((4, 8, 3), np.uint8)
    array[:, 2:6] = 255  # a white band in the middle of an 8x4 image
    x = ImageTransform(resolution=4)(png(array), index=0)
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.allclose(x, torch.ones_like(x))  # the middle 4 columns: all white, scaled to 1
    black = ImageTransform(resolution=2)(png(np.zeros((2, 2, 3), np.uint8)), index=0)
    assert torch.equal(black, -torch.ones(3, 2, 2))


def test_random_crops_are_fixed_per_image_and_flips_mirror_the_pixels():
    transform = ImageTransform(resolution=16, random_crop=True, seed=3)
    boxes = {transform.crop_box((40, 16), i) for i in range(20)}
    assert len(boxes) > 5 and all(b[2] - b[0] == 16 and b[1] == 0 for b in boxes)
    assert transform.crop_box((40, 16), 7) == ImageTransform(16, True, seed=3).crop_box((40, 16), 7)
    assert transform.crop_box((40, 16), 7) != ImageTransform(16, True, seed=4).crop_box((40, 16), 7)
    data = png(np.random.default_rng(0).integers(0, 256, (16, 40, 3), dtype=np.uint8))
    assert torch.equal(transform(data, 7, flip=True), transform(data, 7).flip(-1))


def test_cached_latents_are_read_from_disk_once_while_the_memory_budget_has_room(
    folder, tmp_path, monkeypatch
):
    cache, keys = TensorCache(tmp_path), [f"{i:02x}" * 32 for i in range(4)]
    for i, key in enumerate(keys):  # mean and std of an 8x8x4 latent: 2,048 bytes an entry
        cache.save(key, {"mean": torch.full((4, 8, 8), float(i)), "std": torch.ones(4, 8, 8)})
    files = [cache.entry(key) for key in keys]
    reads, load = [], ShardIndex.load
    monkeypatch.setattr(
        ShardIndex, "load", lambda self, key: reads.append(cache.entry(key)) or load(self, key)
    )
    monkeypatch.setattr(dataset, "CACHE_MEMORY_BYTES", 3 * 2048)  # room for three of the four
    examples = TrainingExamples(load_rows(folder), "image", ImageTransform(4), torch.zeros(4, 5),
                                latent_files=[[f, None] for f in files])  # fmt: skip
    for _epoch in range(3):
        batch = torch.utils.data.default_collate([examples[(i, False)] for i in range(4)])
        assert torch.equal(batch["mean"][:, 0, 0, 0], torch.arange(4.0)) and "pixels" not in batch
        batch["mean"].add_(1)  # the step's own copy: what the examples keep is untouched
    assert reads == files + [files[3]] * 2  # the fourth, past the budget, read at every epoch
    assert examples.memory_bytes == 3 * 2048


def test_examples_are_pixels_and_token_ids_without_a_cache(folder):
    rows = load_rows(folder)
    ids = torch.arange(4 * 5).reshape(4, 5)
    examples = TrainingExamples(rows, "image", ImageTransform(resolution=4), ids)
    example = examples[(2, True)]
    assert example["pixels"].shape == (3, 4, 4) and torch.equal(example["input_ids"], ids[2])
    unflipped = examples[(2, False)]["pixels"]
    assert torch.equal(example["pixels"], unflipped.flip(-1))
    batch = torch.utils.data.default_collate([examples[(i, False)] for i in range(4)])
    assert batch["pixels"].shape == (4, 3, 4, 4) and batch["input_ids"].shape == (4, 5)
