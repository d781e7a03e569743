"""Hostile data, round three (issue 33, items 4, 5, 8-12): each fault reproduced, and what sdlite does now.

4. a 1 x 10000 PNG at resolution 512 was scaled to 512 x 5,120,000 (MemoryError in PIL);
5. a kohya folder named ``1000000000_big`` listed its repeats one entry each (MemoryError);
8. caption and DreamBooth folders, and plain image folders, followed links out of the data folder;
9. a file name that is not UTF-8 ended the run in pyarrow, naming no file;
10. a corrupt latent-cache entry crashed training mid-run, and cache writes were not fsynced;
11. a full disk while filling the cache gave safetensors' raw error;
12. an empty data folder (datasets' EmptyDatasetError) and a prompt that is not valid text
    (tokenizers' TypeError).
"""

import errno
import io
import os
import tracemalloc

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import SafetensorError

from pipelines import TextToImagePipeline
from sdlite.cli import main as cli
from sdlite.data import shards as shards_module
from sdlite.data.buckets import BucketTransform, make_buckets
from sdlite.data.cache import CacheWriteError, TensorCache, cache_latents
from sdlite.data.captions import MAX_REPEATS, append_problems, caption_rows
from sdlite.data.cleaning import check_image, clean_rows
from sdlite.data.dataset import DataError, ImageTransform, TrainingExamples, load_rows
from sdlite.data.dreambooth import dreambooth_rows
from sdlite.data.samplers import StepSampler
from sdlite.models import build_components, save_components
from sdlite.presets import get_preset
from sdlite.tokenizer import clip_tokenizer, token_ids
from training.config import from_dict
from training.config.unet import TrainConfig
from training.examples import rows_for
from training.train import main as train


def png(size=(8, 8), colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def caption_folder(root, names=("a",)):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / f"{name}.png").write_bytes(png())
        (root / f"{name}.txt").write_text(f"a photo of {name}\n")
    return root


def listed(report) -> str:
    return report.read_text(encoding="utf-8") if report.exists() else ""


def clean(rows, report, bad_data="skip", resolution=8):
    return clean_rows(rows, "image", "text", resolution, None, bad_data, report, lambda line: None)


# ---- 4: an extreme aspect ratio is refused before any resize, and listed ------------------------------

STRIP = png((1, 10000))  # a few hundred bytes; scaled to 512 px it would be 512 x 5,120,000


@pytest.fixture
def no_huge_resize(monkeypatch):
    """Fail (instead of filling the memory) if anything resizes an image to over 10^8 pixels."""
    resize = Image.Image.resize

    def guarded(image, size, *args, **kwargs):
        assert size[0] * size[1] <= 10**8, f"resized to {size}"
        return resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", guarded)


def test_a_thin_strip_is_refused_at_the_check_and_listed_in_bad_files(tmp_path):
    why, _ = check_image({"bytes": STRIP, "path": None}, 512)
    assert why and "aspect ratio too extreme (1x10000, more than 64:1)" in why
    assert check_image({"bytes": png((1, 64)), "path": None}, 512) == (None, "upscaled from 1x64")  # 64:1
    rows = load_rows(write_table(tmp_path, {"strip.png": STRIP, "good.png": png((512, 512))}))
    kept = clean(rows, tmp_path / "bad_files.txt", resolution=512)
    assert [os.path.basename(e["path"]) for e in kept["image"]] == ["good.png"]
    assert "strip.png\taspect ratio too extreme" in listed(tmp_path / "bad_files.txt")


def write_table(root, files: dict[str, bytes]):
    for name, data in files.items():
        (root / name).write_bytes(data)
    lines = "".join(f'{{"file_name": "{name}", "text": "a thing"}}\n' for name in files)
    (root / "metadata.jsonl").write_text(lines)
    return root


def test_square_and_bucket_transforms_refuse_a_thin_strip_before_resizing(no_huge_resize):
    with pytest.raises(DataError, match="aspect ratio too extreme"):
        ImageTransform(512)(STRIP, 0)
    buckets = BucketTransform(512, tuple(make_buckets(512, 64)))
    with pytest.raises(DataError, match="aspect ratio too extreme"):
        buckets(STRIP, 0)
    # Ordinary shapes still train: a 4:1 panorama and a small image, upscaled.
    assert ImageTransform(64)(png((400, 100)), 0).shape == (3, 64, 64)
    assert ImageTransform(64)(png((5, 7)), 0).shape == (3, 64, 64)


# ---- 5: repeats are bounded, and counted rather than listed --------------------------------------------


def test_a_repeat_count_over_the_limit_is_one_line_naming_the_folder(tmp_path):
    caption_folder(tmp_path / "data" / "1000000000_big")
    refusal = f"'1000000000_big' repeats its images 1000000000 times, over the limit of {MAX_REPEATS}"
    with pytest.raises(DataError, match=refusal):
        caption_rows(tmp_path / "data")
    caption_folder(tmp_path / "fine" / f"{MAX_REPEATS}_big")
    rows, _ = caption_rows(tmp_path / "fine")
    assert rows["repeats"] == [MAX_REPEATS]


def test_the_sampler_keeps_repeats_as_counts_not_one_entry_per_repeat():
    repeats = [MAX_REPEATS] * 100  # a million items an epoch
    tracemalloc.start()
    sampler = StepSampler(100, 4, seed=0, max_steps=10, repeats=repeats, buckets=[r % 3 for r in range(100)])
    steps = [sampler.step_items(k) for k in range(3)]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert sampler.num_items == 100 * MAX_REPEATS
    # Each epoch's order is a tensor (8 bytes an item, not traced here); no Python list per item.
    assert peak < 2**20, f"{peak} bytes"
    assert all(len(items) == 4 and all(0 <= r < 100 for r, _ in items) for items in steps)
    with pytest.raises(ValueError, match="over the limit"):
        StepSampler(1, 1, seed=0, max_steps=1, repeats=[MAX_REPEATS + 1])


# ---- 8: links out of the data folder ---------------------------------------------------------------------


@pytest.fixture
def linked(tmp_path):
    """data/ holds a.png (its own) and links to an image and captions outside it."""
    outside = caption_folder(tmp_path / "outside", ("secret", "other"))
    (outside / "private.txt").write_text("private words\n")
    data = caption_folder(tmp_path / "data", ("a",))
    (data / "s.png").symlink_to(outside / "secret.png")
    (data / "s.txt").symlink_to(outside / "secret.txt")
    (data / "c.png").write_bytes(png())  # its own image, a caption linked from outside
    (data / "c.txt").symlink_to(outside / "private.txt")
    return data


def test_a_caption_folder_skips_and_lists_links_out_of_it_unless_allowed(linked, tmp_path):
    rows, _ = caption_rows(linked)
    kept = clean(rows, tmp_path / "bad_files.txt")
    assert kept["text"] == ["a photo of a"]
    report = listed(tmp_path / "bad_files.txt")
    assert "s.png\ta link to a file outside the data folder" in report
    assert "c.txt\ta link to a file outside the data folder" in report and "allow_outside_paths" in report
    with pytest.raises(DataError, match="outside the data folder"):
        clean(caption_rows(linked)[0], None, bad_data="error")  # as tables do with bad_data=error
    allowed, _ = caption_rows(linked, allow_outside=True)
    assert sorted(clean(allowed, None)["text"]) == ["a photo of a", "a photo of secret", "private words"]


def test_the_trainer_passes_allow_outside_paths_to_caption_and_dreambooth_folders(linked):
    cfg = from_dict(TrainConfig, dict(image_column="image", caption_column="text", bad_data="skip",
                                      allow_outside_paths=False))  # fmt: skip
    assert len(clean(rows_for(cfg.data, cfg.dreambooth, str(linked))[0], None)) == 1
    cfg.data.allow_outside_paths = True
    assert len(clean(rows_for(cfg.data, cfg.dreambooth, str(linked))[0], None)) == 3
    cfg.dreambooth.instance_data_dir, cfg.dreambooth.instance_prompt = str(linked), "sks"
    assert len(clean(rows_for(cfg.data, cfg.dreambooth, str(linked))[0], None)) == 3
    cfg.data.allow_outside_paths = False
    assert (
        len(clean(rows_for(cfg.data, cfg.dreambooth, str(linked))[0], None)) == 2
    )  # a.png, c.png: DreamBooth reads no captions


def test_dreambooth_and_plain_image_folders_refuse_links_out_of_them(linked, tmp_path):
    rows = dreambooth_rows(linked, "a photo of sks dog")
    kept = clean(rows, tmp_path / "bad_files.txt")
    assert sorted(os.path.basename(e["path"]) for e in kept["image"]) == ["a.png", "c.png"]
    assert "s.png\ta link to a file outside the data folder" in listed(tmp_path / "bad_files.txt")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.png").write_bytes(png())
    (plain / "s.png").symlink_to(tmp_path / "outside" / "secret.png")
    with pytest.raises(DataError, match="s.png: a link to a file outside the data folder"):
        load_rows(plain, "image", "image")
    rows = load_rows(plain, "image", "image", bad_data="skip")
    kept = clean_rows(rows, "image", "image", 8, None, "skip", tmp_path / "plain.txt", lambda line: None)
    assert [os.path.basename(e["path"]) for e in kept["image"]] == ["a.png"]
    assert "s.png\ta link to a file outside" in listed(tmp_path / "plain.txt")
    assert len(load_rows(plain, "image", "image", allow_outside=True)) == 2
    (plain / "a.png").unlink()  # nothing left but the link: listed, and the run stops
    with pytest.raises(DataError, match="none of the 1 rows has a usable image"):
        clean_rows(load_rows(plain, "image", "image", bad_data="skip"), "image", "image", 8, None, "skip")


# ---- 9: a file name that is not UTF-8 -------------------------------------------------------------------


def test_a_file_name_that_is_not_utf8_is_skipped_and_listed_by_its_bytes(tmp_path):
    data = caption_folder(tmp_path / "data", ("a",))
    bad = os.fsencode(data) + b"/b\xff"
    with open(bad + b".png", "wb") as f:
        f.write(png())
    with open(bad + b".txt", "wb") as f:
        f.write(b"a photo of b\n")
    with open(os.fsencode(data) + b"/orphan\xfe.txt", "wb") as f:
        f.write(b"no image\n")
    rows, problems = caption_rows(data)
    report = tmp_path / "bad_files.txt"
    kept = clean(rows, report)
    append_problems(report, problems)  # as the trainer does: clean_rows' list, then the folder's
    assert kept["text"] == ["a photo of a"]
    text = listed(report)
    assert (
        "b\\xff.png\tfile name is not UTF-8 text" in text and "orphan\\xfe.txt\tcaption file without" in text
    )
    instances = dreambooth_rows(data, "a photo of sks dog")
    assert len(clean(instances, None)) == 1
    with pytest.raises(DataError, match=r"b\\xff.png: file name is not UTF-8"):
        load_rows(data, "image", "image")  # a plain image folder (read through imagefolder)


# ---- 10, 11: the latent cache: corrupt entries, durable writes, a full disk ---------------------------


def entries(cache, count=3):
    keys = [f"{i:02x}" * 32 for i in range(count)]
    cache.fill(keys, lambda positions: {"mean": torch.arange(len(positions), dtype=torch.float32)[:, None]})
    return keys


def test_a_corrupt_entry_is_named_and_computed_again_at_the_next_start(tmp_path, capsys):
    cache = TensorCache(tmp_path, shard_entries=1)  # a shard an entry: a resumed run fills its cache again
    keys = entries(cache)
    path = cache.shard(keys[1])
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 8 + data[8:])  # safetensors: "header too large"
    cache = TensorCache(tmp_path)  # the next start
    computed = cache.fill(keys, lambda positions: {"mean": torch.full((len(positions), 1), 5.0)})
    logged = capsys.readouterr().out
    assert computed == 1 and str(path) in logged and "header too large" in logged
    assert cache.load(keys[1])["mean"].tolist() == [5.0]


def test_a_corrupt_entry_met_mid_run_is_removed_and_another_row_trains(tmp_path):
    cache = TensorCache(tmp_path / "cache", shard_entries=1)
    keys = entries(cache)
    files = [[cache.entry(k), None] for k in keys]
    path = cache.shard(keys[1])
    path.write_bytes(b"garbage")
    rows = load_rows(write_table(tmp_path, {f"{i}.png": png() for i in range(3)}))
    logs = []
    ids = torch.zeros(3, 4, dtype=torch.long)
    examples = TrainingExamples(rows, "image", ImageTransform(8), ids, latent_files=files,
                                report=tmp_path / "bad_files.txt", log=logs.append)  # fmt: skip
    example = examples[(1, False)]
    assert example["mean"].tolist() == [2.0]  # row 2's entry in its place
    assert not path.exists() and "1.png" in logs[0] and str(path) in logs[0]
    assert "does not read" in listed(tmp_path / "bad_files.txt")


def test_cache_writes_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    fsync, replace = os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a))) or replace(a, b))
    TensorCache(tmp_path).save("ab" * 32, {"x": torch.zeros(2)})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "replace"] and events[0][1] == events[1][1]  # the same .tmp file, synced first


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_a_full_disk_while_caching_says_what_was_written_and_that_nothing_was_lost(tmp_path, monkeypatch,
                                                                                   failure):  # fmt: skip
    def full(tensors, path):
        open(path, "wb").write(b"partial")
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "
                              '"No space left on device" })')  # fmt: skip

    monkeypatch.setattr(shards_module, "save_file", full)
    torch.manual_seed(0)
    vae = AutoencoderKL(**get_preset("tiny").config("vae")).eval()
    rows = load_rows(write_table(tmp_path, {"0.png": png((32, 32))}))
    with pytest.raises(CacheWriteError) as error:
        cache_latents(TensorCache(tmp_path / "cache"), rows, "image", ImageTransform(32), vae)
    message = str(error.value)
    assert message.startswith("could not write latents to the cache") and "No space left on device" in message
    assert "Nothing was lost" in message and "Free disk space" in message and "\n" not in message
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ---- 12: an empty data folder; a prompt that is not valid text ------------------------------------------


def test_an_empty_data_folder_is_one_line_naming_it_and_what_it_should_hold(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="'.*empty' holds no images: put images there") as error:
        load_rows(tmp_path / "empty")
    assert "metadata.jsonl" in str(error.value) and ".txt" in str(error.value)


@pytest.fixture(scope="module")
def pipe():
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(prompt="a red \udcff circle"), "prompt"),  # sys.argv's form of the byte 0xff
        (dict(prompt=["a red circle", "x\ud800"]), r"prompt\[1\]"),
        (dict(prompt="a red circle", negative_prompt="blue\udce9"), "negative_prompt"),
    ],
)
def test_a_prompt_that_is_not_valid_text_is_an_error_naming_the_argument(pipe, kwargs, named):
    with pytest.raises(
        ValueError, match=f"^{named} .* is not valid text: character \\d+ is a lone surrogate"
    ):
        pipe(**kwargs, num_inference_steps=1, output_type="np")
    with pytest.raises(ValueError, match="text 1 of 2 .* is not valid text"):
        token_ids(clip_tokenizer(), ["fine", "not \udcff fine"])


def test_the_cli_says_which_prompt_is_not_valid_text(tmp_path, capsys):
    model = save_components(build_components("tiny", seed=0), tmp_path / "model")
    capsys.readouterr()
    argv = ["generate", os.fsdecode(b"a red \xff circle"), "--model", str(model), "--steps", "1"]
    assert cli(argv + ["--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlite generate: error: prompt") and "not valid text" in err and "\n" not in err


# ---- all of it in one run: a hostile caption folder trains, and resumes over a corrupt cache entry ------


def test_a_hostile_caption_folder_trains_lists_what_it_refused_and_resumes_over_a_bad_cache_entry(
    tmp_path, capsys
):
    data = caption_folder(tmp_path / "data" / "2_subject", ("a", "b", "c"))
    (data / "strip.png").write_bytes(STRIP)
    (data / "strip.txt").write_text("a thin strip\n")
    caption_folder(tmp_path / "outside", ("secret",))
    (data / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    with open(os.fsencode(data) + b"/\xff.png", "wb") as f:
        f.write(png())
    out, cache = tmp_path / "run", tmp_path / "cache"

    def argv(steps: int) -> list[str]:
        flags = dict(train_data_dir=tmp_path / "data", output_dir=out, cache_dir=cache, report_to="none",
                     max_steps=steps, train_batch_size=2, checkpoint_every=1)  # fmt: skip
        flags["aspect_buckets"] = "true"
        return [text for key, value in flags.items() for text in (f"--{key}", str(value))]

    train(argv(2))
    report = listed(out / "bad_files.txt")
    assert "strip.png\taspect ratio too extreme" in report and "link.png\ta link to a file outside" in report
    assert "\\xff.png\tfile name is not UTF-8 text" in report
    for entry in cache.rglob("*.safetensors"):  # the power went before the cache's writes reached the disk
        entry.write_bytes(b"")
    capsys.readouterr()
    train(argv(3) + ["--resume", "latest"])
    assert (out / "checkpoint-3").is_dir() and "unreadable shard (" in capsys.readouterr().out
