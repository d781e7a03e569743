"""A folder of parquet shards is a training source without --streaming (load_rows reads it whole)."""

import datasets
import pytest

from sdlite.data.dataset import DataError, image_bytes, load_rows
from sdlite.data.shapes import write_dataset
from sdlite.data.streaming import write_shards


def test_a_folder_of_parquet_shards_reads_every_row_in_shard_order(tmp_path):
    write_dataset(tmp_path / "folder", count=6, seed=0)
    write_shards(tmp_path / "folder", tmp_path / "shards", 3, seed=None)
    source = load_rows(tmp_path / "folder")
    rows = load_rows(tmp_path / "shards")  # datasets alone: "Instruction train corresponds to no data"
    assert len(rows) == 6 and rows["text"] == source["text"]
    assert [image_bytes(e) for e in rows["image"]] == [image_bytes(e) for e in source["image"]]


def test_image_paths_in_parquet_shards_are_read_from_the_shards_folder_and_kept_inside_it(tmp_path):
    write_dataset(tmp_path / "shards", count=2, seed=0)
    files = sorted(p.name for p in (tmp_path / "shards").glob("*.png"))
    table = {"image": files, "text": ["one", "two"]}
    datasets.Dataset.from_dict(table).to_parquet(str(tmp_path / "shards" / "part-00000.parquet"))
    (tmp_path / "shards" / "metadata.jsonl").unlink()  # an image folder's metadata would win
    rows = load_rows(tmp_path / "shards")
    assert image_bytes(rows[1]["image"]) == (tmp_path / "shards" / files[1]).read_bytes()
    datasets.Dataset.from_dict({"image": ["../secret.png"], "text": ["x"]}).to_parquet(
        str(tmp_path / "shards" / "part-00001.parquet")
    )
    with pytest.raises(DataError, match="secret.png"):
        load_rows(tmp_path / "shards")
