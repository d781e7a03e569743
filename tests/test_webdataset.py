"""WebDataset tar shards as training input (sdlite/data/webdataset.py through load_rows): read by
``datasets``, with buckets and caption options as for folders; a corrupt shard or a sample without a
caption is one line."""

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from test_train_photo_sets import COLORS, picture

from sdlite.data.cleaning import clean_rows
from sdlite.data.dataset import load_rows
from sdlite.data.files import DataError
from training.config import parse_config
from training.config.unet import TrainConfig
from training.train import UNetTrainer

# (key, size, colour, shape, caption member): 3 aspect buckets at resolution 64, bucket_step 32.
SAMPLES = [
    ("a", (64, 64), "red", "circle", "txt"),
    ("b", (150, 50), "blue", "square", "json"),
    ("c", (40, 120), "green", "circle", "txt"),
    ("d", (70, 60), "red", "square", "txt"),
    ("e", (99, 30), "green", "square", "json"),
    ("f", (64, 70), "blue", "circle", "txt"),
]


def image_bytes(tmp: Path, key: str, size, colour: str, shape: str, ext: str) -> bytes:
    return picture(tmp / f"{key}.{ext}", size, colour, shape).read_bytes()


def write_shards(folder: Path, samples=SAMPLES, per_shard: int = 4, drop_caption: str | None = None) -> Path:
    """Samples as tar shards of ``per_shard``: .png images but one .jpg, captions in .txt or .json."""
    folder.mkdir(parents=True, exist_ok=True)
    members = []
    for key, size, colour, shape, caption in samples:
        ext = "jpg" if key == "c" else "png"
        members.append((f"{key}.{ext}", image_bytes(folder.parent, key, size, colour, shape, ext)))
        text = f"{colour}, {shape}"
        if key != drop_caption:
            data = text.encode() if caption == "txt" else json.dumps({"text": text, "w": size[0]}).encode()
            members.append((f"{key}.{caption}", data))
    shards = {}
    for name, data in members:
        shards.setdefault(f"shard-{'abcdef'.index(name[0]) // per_shard:05d}.tar", []).append((name, data))
    for shard, contents in shards.items():
        with tarfile.open(folder / shard, "w") as tar:
            for name, data in contents:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return folder


def test_tar_shards_read_as_rows_of_encoded_images_and_captions_from_txt_or_json(tmp_path):
    rows = load_rows(write_shards(tmp_path / "shards"))
    assert rows.column_names == ["image", "text"] and len(rows) == 6
    assert rows["text"] == [f"{c}, {s}" for _, _, c, s, _ in SAMPLES]
    sizes = [Image.open(io.BytesIO(entry["bytes"])).size for entry in rows["image"]]
    assert sizes == [size for _, size, *_ in SAMPLES]  # .png and .jpg members alike, in order
    one = load_rows(tmp_path / "shards" / "shard-00001.tar")  # a single shard is a source too
    assert one["text"] == ["green, square", "blue, circle"]


def test_a_corrupt_tar_shard_is_one_line_naming_it_and_the_last_member_that_read(tmp_path):
    folder = write_shards(tmp_path / "shards")
    shard = folder / "shard-00000.tar"
    with tarfile.open(shard) as tar:
        second = tar.getmembers()[1]
    assert second.name == "a.txt"
    shard.write_bytes(shard.read_bytes()[: second.offset_data + 3])  # a copy cut short in a.txt's data
    with pytest.raises(DataError) as error:
        load_rows(folder)
    message = str(error.value)
    assert "shard-00000.tar' is corrupt after member 'a.png' (member 'a.txt' cut short" in message
    assert "re-create it" in message
    assert "\n" not in message


def test_a_sample_without_a_caption_is_one_line_or_with_skip_a_listed_row(tmp_path):
    folder = write_shards(tmp_path / "shards", drop_caption="e")
    with pytest.raises(DataError) as error:
        load_rows(folder)
    message = str(error.value)
    assert message.startswith("1 samples of the tar shards cannot be trained: shard-00001.tar sample 'e': ")
    assert "no caption member" in message and "bad_data to skip" in message and "\n" not in message
    rows = load_rows(folder, bad_data="skip")
    report = tmp_path / "bad_files.txt"
    kept = clean_rows(rows, "image", "text", 64, None, "skip", report, print)
    assert len(kept) == 5 and "e" not in [t.split(",")[0] for t in kept["text"]]
    assert "shard-00001.tar sample 'e'\tno caption member" in report.read_text()


def test_tar_shards_train_in_aspect_buckets_with_the_caption_prefix(tmp_path, cache):
    folder = write_shards(tmp_path / "shards")
    values = dict(train_data_dir=folder, output_dir=tmp_path / "run", cache_dir=cache, max_steps=3,
                  train_batch_size=2, resolution=64, aspect_buckets="true", bucket_step=32,
                  caption_prefix="sks", cache_text="false", report_to="none", checkpoint_every=0)  # fmt: skip
    trainer = UNetTrainer(
        parse_config(TrainConfig, [t for k, v in values.items() for t in (f"--{k}", str(v))])
    )
    counts = json.loads((tmp_path / "run" / "buckets.json").read_text())
    assert counts == {"32x96": 1, "64x64": 3, "96x32": 2}  # as the same photos in a folder bucket
    tokenizer = trainer.parts.tokenizer
    for _ in range(3):
        batch = next(trainer.batches)
        assert batch["mean"].shape[-2:] in {(16, 16), (8, 24), (24, 8)}  # one bucket's cached latents
        texts = [
            tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") for ids in batch["input_ids"]
        ]
        assert all(text.startswith("sks, ") and text.split(", ")[1] in COLORS for text in texts)
