"""Streaming training data (sdlite/data/streaming.py): parquet shards of the shapes data, read lazily."""

import hashlib

import datasets
import pytest
import torch
from safetensors.torch import load_file

from sdlite.data.dataset import DataError, ImageTransform
from sdlite.data.shapes import write_dataset
from sdlite.data.streaming import StreamingExamples, load_stream, parquet_rows, write_shards
from sdlite.models import build_components
from training.train import main

ROWS, SHARDS = 16, 4


@pytest.fixture(autouse=True)
def _no_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever a shuffled parquet stream's reader threads stop (the end of an epoch,
    # a closed iterator: an Arrow workaround for threads alive at interpreter exit); these tests stop many.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    write_dataset(root / "folder", count=ROWS, seed=0)
    write_shards(root / "folder", root / "shards", SHARDS)
    return root / "shards"


@pytest.fixture(scope="module")
def tokenizer():
    return build_components("tiny", seed=0).tokenizer


def examples(shards, tokenizer, rank=0, world=1, batch=2, **kw) -> StreamingExamples:
    stream = load_stream(shards)
    return StreamingExamples(stream, "image", "text", ImageTransform(32), tokenizer, batch, seed=0,
                             num_processes=world, process_index=rank, shuffle_buffer=4, **kw)  # fmt: skip


def row_key(row: dict) -> str:
    return hashlib.sha1(row["image"]["bytes"]).hexdigest() + row["text"]


def first_rows(stream: StreamingExamples, n: int) -> list[str]:
    rows = stream.rows()
    return [row_key(next(rows)) for _ in range(n)]


def test_shards_are_read_as_a_lazy_iterable_dataset(shards):
    stream = load_stream(shards)
    assert isinstance(stream, datasets.IterableDataset)  # never a materialised datasets.Dataset
    assert stream.num_shards == SHARDS and parquet_rows(shards) == ROWS
    assert sum(1 for _ in stream) == ROWS
    with pytest.raises(ValueError, match="no caption column"):
        load_stream(shards, caption_column="caption")


def test_two_processes_read_disjoint_shards_that_cover_the_data(shards, tokenizer):
    epoch = ROWS // 2  # 4 shards over 2 processes: 2 shards of 4 rows each
    mine = [set(first_rows(examples(shards, tokenizer, rank, 2), epoch)) for rank in (0, 1)]
    assert len(mine[0]) == len(mine[1]) == epoch
    assert not mine[0] & mine[1]
    assert len(mine[0] | mine[1]) == ROWS


def test_each_epoch_shuffles_the_same_rows_again_reproducibly(shards, tokenizer):
    rows = first_rows(examples(shards, tokenizer), 2 * ROWS)
    assert sorted(rows[:ROWS]) == sorted(rows[ROWS:]) and len(set(rows[:ROWS])) == ROWS
    assert rows[:ROWS] != rows[ROWS:]  # epoch 1 is shuffled by (seed, 1)
    assert first_rows(examples(shards, tokenizer), 2 * ROWS) == rows


def test_a_resumed_loader_continues_with_the_same_batches_with_any_number_of_workers(shards, tokenizer):
    stream = examples(shards, tokenizer, random_flip=True)
    batches = iter(stream.loader(start_step=0))
    whole = [next(batches) for _ in range(12)]  # 24 rows: into the second epoch
    assert whole[0]["pixels"].shape == (2, 3, 32, 32)
    assert whole[0]["input_ids"].shape == (2, tokenizer.model_max_length)
    resumed = iter(examples(shards, tokenizer, random_flip=True).loader(start_step=5, num_workers=2))
    for expected in whole[5:]:
        batch = next(resumed)
        assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_a_worker_s_epochs_are_its_own_when_another_worker_moves_the_shared_epoch(
    shards, tokenizer, monkeypatch
):
    # datasets keeps a stream's epoch in one shared-memory tensor for all DataLoader workers; each of ours
    # reads the whole stream at its own pace. Model a worker a whole epoch ahead: every set_epoch(e) is
    # followed by the other worker's set_epoch(e + 1) on the shared tensor, before the rows are read.
    stream = examples(shards, tokenizer)
    expected = first_rows(examples(shards, tokenizer), 2 * ROWS)
    shared, set_epoch = stream.share._epoch, datasets.IterableDataset.set_epoch

    def ahead(self, epoch):
        set_epoch(self, epoch)
        shared.fill_(epoch + 1)

    monkeypatch.setattr(datasets.IterableDataset, "set_epoch", ahead)
    assert first_rows(stream, 2 * ROWS) == expected


def flags(shards, out, **overrides) -> list[str]:
    values = dict(train_data_dir=shards, streaming="true", shuffle_buffer=4, output_dir=out, max_steps=4,
                  train_batch_size=2, learning_rate=1e-3, report_to="none", checkpoint_every=2, log_every=2,
                  ema_decay="none", cache_dir=out / "cache", seed=0)  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def test_streamed_training_decodes_each_step_s_batch_once_and_resumes_exactly(shards, tmp_path, monkeypatch):
    decoded = []
    example = StreamingExamples.example
    monkeypatch.setattr(StreamingExamples, "example", lambda self, *a: decoded.append(1) or example(self, *a))
    main(flags(shards, tmp_path / "whole"))
    assert len(decoded) == 4 * 2  # steps x batch: nothing read ahead of need, nothing decoded twice
    assert not (tmp_path / "whole" / "cache").exists()  # no latent or text cache
    main(flags(shards, tmp_path / "split", max_steps=2))
    main(flags(shards, tmp_path / "split", resume="latest"))
    a, b = (load_file(next((tmp_path / run / "final" / "unet").glob("*.safetensors")))
            for run in ("whole", "split"))  # fmt: skip
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_json_shards_naming_files_outside_their_folder_or_fifos_stop_with_the_path_named(tmp_path, tokenizer):
    import json
    import os

    write_dataset(tmp_path / "images", count=2, seed=0)
    (tmp_path / "shards").mkdir()
    os.mkfifo(tmp_path / "shards" / "pipe.png")  # reading it would block the stream for ever
    rows = [("../images/000000.png", "up and out"), ("pipe.png", "a fifo")]
    (tmp_path / "shards" / "part-0.jsonl").write_text(
        "".join(json.dumps({"image": p, "text": t}) + "\n" for p, t in rows)
    )
    with pytest.raises(DataError, match="'../images/000000.png' is outside the data folder"):
        next(iter(load_stream(tmp_path / "shards")))
    stream = StreamingExamples(load_stream(tmp_path / "shards", allow_outside=True), "image", "text",
                               ImageTransform(32), tokenizer, 2, seed=0, shuffle_buffer=1)  # fmt: skip
    with pytest.raises(DataError, match="image .*pipe.png: .*is a FIFO, not a regular file"):
        next(iter(stream))
