"""The latent and text cache in shards (sdlite/data/shards.py, sdlite/data/cache.py, cache_clean.py):
a few files per thousand entries, many writers into one folder, resumable, torn files never read,
cleanable."""

import inspect
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdlite.cli import main as cli
from sdlite.data.cache import DecodedImages, TensorCache, cache_latents
from sdlite.data.cache_clean import clean_cache
from sdlite.data.dataset import BadCacheEntry, ImageTransform, load_rows
from sdlite.data.shards import SHARD_NAME
from tests.test_cache import tiny_vae, write_folder

ROOT = Path(__file__).resolve().parents[1]


def keys_of(count: int, start: int = 0) -> list[str]:
    import hashlib

    return [hashlib.sha256(str(i).encode()).hexdigest() for i in range(start, start + count)]


def values(positions) -> dict[str, torch.Tensor]:
    """Entry i holds (i, -i): any mix-up between entries shows."""
    p = torch.tensor(positions, dtype=torch.float32)
    return {"mean": torch.stack([p, -p], 1), "std": p[:, None].repeat(1, 3)}


def shards(root: Path) -> list[Path]:
    folder = root / "shards"
    return sorted(p for p in folder.iterdir() if SHARD_NAME.match(p.name)) if folder.is_dir() else []


def test_entries_go_into_a_few_shards_and_read_back_from_a_new_process(tmp_path):
    keys = keys_of(1030)
    assert TensorCache(tmp_path).fill(keys, values, batch_size=64) == 1030
    assert len(shards(tmp_path)) == 2 and sorted(os.listdir(tmp_path)) == ["shards"]  # 1,024 + 6
    again = TensorCache(tmp_path)  # merges the shards' headers
    assert all(k in again for k in keys) and again.fill(keys, values) == 0
    entry = again.load(keys[1029])
    assert entry["mean"].tolist() == [1029.0, -1029.0] and entry["std"].tolist() == [1029.0] * 3


def test_a_changed_vae_misses_and_its_entries_are_its_own_never_the_old_ones(tmp_path):
    data = write_folder(tmp_path / "data")
    cache, transform = TensorCache(tmp_path / "cache"), ImageTransform(32)
    old, new = tiny_vae(0), tiny_vae(1)
    cache_latents(cache, load_rows(data), "image", transform, old)
    files, computed = cache_latents(cache, load_rows(data), "image", transform, new)
    assert computed == 4
    pixels = transform((data / "0.png").read_bytes(), 0)[None]
    with torch.no_grad():
        expected = new.encode(pixels).latent_dist.mean[0]
    torch.testing.assert_close(files[0][0].load()["mean"], expected)


FILL = """
import sys, time, torch
from sdlite.data.cache import TensorCache
KEYS_OF_AND_VALUES
rank, world, delay = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def slow(positions):
    time.sleep(delay)
    return values(positions)
print(TensorCache(sys.argv[1], shard_entries=4).fill(keys_of(48), slow, 2, rank, world), flush=True)
"""


def start_fill(root: Path, rank: int, world: int, delay: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = FILL.replace("KEYS_OF_AND_VALUES", inspect.getsource(keys_of) + inspect.getsource(values))
    argv = [sys.executable, "-c", script, str(root), str(rank), str(world), str(delay)]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)


def test_two_processes_fill_one_folder_each_writing_only_files_of_its_own(tmp_path):
    fills = [start_fill(tmp_path, rank, 2, 0.01) for rank in (0, 1)]
    seen = [int(f.communicate(timeout=300)[0]) for f in fills]  # missing, as each saw it when it started
    assert all(0 < n <= 48 for n in seen)
    writers = {p.name.rsplit("-", 3)[1] for p in shards(tmp_path)}  # host-pid-random-n
    assert writers == {str(f.pid) for f in fills}  # each file named by the one process that wrote it
    cache = TensorCache(tmp_path)
    for i, key in enumerate(keys_of(48)):
        assert cache.load(key)["mean"].tolist() == [i, -i]
    assert not list((tmp_path / "shards").glob("*.tmp"))


def test_a_killed_fill_keeps_what_it_published_and_the_next_computes_only_the_rest(tmp_path):
    fill = start_fill(tmp_path, 0, 1, 0.2)
    deadline = time.time() + 300  # the child imports torch first: slow on a busy machine
    while len(shards(tmp_path)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    fill.send_signal(signal.SIGKILL)
    fill.wait()
    kept = len(shards(tmp_path))
    assert 2 <= kept < 12  # killed part-way: some shards of 4 published, not all
    calls = []
    done = TensorCache(tmp_path).fill(keys_of(48), lambda p: calls.append(p) or values(p), 2)
    assert done == 48 - 4 * kept == sum(map(len, calls))
    cache = TensorCache(tmp_path)
    assert [cache.load(k)["mean"][0].item() for k in keys_of(48)] == list(range(48))


def test_a_torn_shard_is_named_removed_and_its_entries_computed_again_never_read(tmp_path, capsys):
    keys = keys_of(12)
    TensorCache(tmp_path, shard_entries=4).fill(keys, values)
    torn = shards(tmp_path)[1]
    torn.write_bytes(torn.read_bytes()[:-7])  # a copy cut short, a crash of an unsynced write
    (tmp_path / "shards" / (torn.name + ".tmp")).write_bytes(b"half a shard")  # a writer killed mid-write
    cache = TensorCache(tmp_path)
    calls = []
    assert cache.fill(keys, lambda p: calls.append(p) or values(p)) == 4
    assert f"{torn}: unreadable shard (" in capsys.readouterr().out and not torn.exists()
    assert sorted(i for c in calls for i in c) == [4, 5, 6, 7]  # the torn shard's four, nothing else
    assert [TensorCache(tmp_path).load(k)["mean"][0].item() for k in keys] == list(range(12))


def test_decoded_images_are_kept_in_one_file_per_writer_and_a_torn_record_is_ignored(tmp_path):
    images = [bytes([i]) * 100 for i in range(5)]
    decoded = DecodedImages(tmp_path)
    for data in images[:3]:
        decoded.add(data)
    files = list((tmp_path / "decoded").iterdir())
    assert len(files) == 1
    with open(files[0], "ab") as f:
        f.write(DecodedImages.key(images[3])[:20])  # the last record cut short
    later = DecodedImages(tmp_path)
    assert [data in later for data in images] == [True, True, True, False, False]


def test_an_entry_handed_out_before_another_process_wrote_it_reads_and_pickles_for_workers(tmp_path):
    keys = keys_of(3)
    reader = TensorCache(tmp_path)
    entries = [reader.entry(k) for k in keys]  # handed out before the fill, as to a waiting process
    TensorCache(tmp_path).fill(keys, values)  # another process's writer
    assert entries[2].load()["mean"].tolist() == [2.0, -2.0]
    worker = pickle.loads(pickle.dumps(entries))  # a DataLoader worker maps the shards itself
    assert worker[1].load()["mean"].tolist() == [1.0, -1.0] and worker[1] == entries[1]


def test_clean_removes_unused_broken_and_left_over_cache_files_and_nothing_else(tmp_path, capsys):
    old, used, keys = keys_of(4), keys_of(4, start=4), keys_of(4, start=8)
    for group in (old, used, keys):
        TensorCache(tmp_path).fill(group, values)
    stale, touched, broken = (TensorCache(tmp_path).shard(group[0]) for group in (old, used, keys))
    month_ago = time.time() - 40 * 86400
    for path in (stale, touched):
        os.utime(path, (month_ago, month_ago))
    TensorCache(tmp_path).fill(used, values)  # a run needs these again: their shard is used now
    broken.write_bytes(b"")
    left_over = tmp_path / "shards" / (broken.name + ".tmp")
    live = tmp_path / "shards" / "host-1-0123abcd-00000.safetensors.tmp"  # a writer busy right now
    for path in (left_over, live):
        path.write_bytes(b"partial")
    os.utime(left_over, (month_ago, month_ago))
    legacy = [tmp_path / "ab" / f"{'ab' * 32}.safetensors", tmp_path / "decoded" / "cd" / ("cd" * 32)]
    theirs = [tmp_path / "notes.txt", tmp_path / "shards" / "README", tmp_path / "ab" / "mine.safetensors"]
    for path in legacy + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    images = [bytes([i]) * 10 for i in range(4)]
    for data in images:  # four runs' records of checked images, a file each
        DecodedImages(tmp_path).add(data)
    records = sorted((tmp_path / "decoded").glob("*.keys"))
    for path in records:
        os.utime(path, (month_ago, month_ago))
    cleaned = clean_cache(tmp_path, keep_days=30)
    assert sorted(cleaned.files) == sorted([stale, broken, left_over, *legacy, *records])
    assert len(list((tmp_path / "decoded").glob("*.keys"))) == 1  # merged into one
    assert all(data in DecodedImages(tmp_path) for data in images)
    assert touched.exists() and live.exists() and all(p.exists() for p in theirs)
    assert all(k in TensorCache(tmp_path) for k in used)
    assert cli(["data", "clean-cache", "--cache_dir", str(tmp_path), "--keep_days", "0"]) == 0
    assert "removed 1 files" in capsys.readouterr().out and not touched.exists()


def test_an_entry_in_two_shards_reads_from_the_other_once_the_first_turns_out_bad(tmp_path):
    keys = keys_of(2)
    for name in ("a", "b"):  # two machines computed the same entries at once, each seeing none of the other's
        TensorCache(tmp_path / name).fill(keys, values)
    (other,) = shards(tmp_path / "b")
    other.rename(tmp_path / "a" / "shards" / other.name)
    cache = TensorCache(tmp_path / "a")
    first = cache.shard(keys[1])
    first.write_bytes(b"garbage")  # after the index read its header: found when the entry is read
    with pytest.raises(BadCacheEntry, match="does not read"):
        cache.entry(keys[1]).load()
    assert not first.exists() and cache.entry(keys[1]).load()["mean"].tolist() == [1.0, -1.0]
