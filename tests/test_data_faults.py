"""Hostile data (issue 15, items 7-10): each fault reproduced, and what the loader now does instead.

7. an image that breaks after the start-up check (uncached: read again every epoch);
8. metadata that ``datasets`` fails on with raw errors (a caption that is a number or a list, bytes
   that are not UTF-8, a line that is not JSON), duplicate file names, EXIF orientation;
9. a table that names files outside its folder, a FIFO, a device, a file over the byte limit;
10. a small PNG that declares 13000 x 13000 16-bit pixels, and decoding without float64 copies.
"""

import io
import json
import os
import signal
import struct
import tracemalloc
import zlib

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from sdlite.data.cleaning import check_image, clean_rows
from sdlite.data.dataset import DataError, ImageTransform, TrainingExamples, image_bytes, load_rows
from sdlite.data.decoding import FLOOR_PIXELS, decode_image, image_size, pixel_limit
from sdlite.data.files import read_file


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_folder(root, lines: list[bytes], count: int = 4):
    """``count`` 8x8 images 0000.png ... and a metadata.jsonl of the given raw lines."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        (root / f"{i:04d}.png").write_bytes(png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def line(name: str, text) -> bytes:
    return json.dumps({"file_name": name, "text": text}).encode()


# ---- 7: an image that breaks after the start-up check ---------------------------------------------


def test_an_image_that_breaks_after_the_check_is_listed_and_the_next_row_trains_in_its_place(tmp_path):
    folder = write_folder(tmp_path / "data", [line(f"{i:04d}.png", f"caption {i}") for i in range(4)])
    rows = clean_rows(load_rows(folder), "image", "text", 8, None, "skip", None, print)
    report, logs = tmp_path / "bad_files.txt", []
    examples = TrainingExamples(
        rows, "image", ImageTransform(8), torch.zeros(4, 3), report=report, log=logs.append
    )
    expected = examples[(2, False)]["pixels"]
    (folder / "0001.png").write_bytes(b"replaced by a sync client while training\n")
    # Before: PIL.UnidentifiedImageError naming no file, from the DataLoader, and the run was lost.
    assert torch.equal(examples[(1, False)]["pixels"], expected)  # row 2 trains in row 1's place
    assert torch.equal(examples[(1, False)]["pixels"], expected)  # the same every time
    (listed,) = report.read_text().splitlines()
    name, problem, action = listed.split("\t")
    assert name.endswith("0001.png") and problem.startswith("not an image") and action.startswith("skipped")
    assert len(logs) == 1 and "0001.png" in logs[0]  # told once, not at every epoch
    for i in range(4):
        (folder / f"{i:04d}.png").unlink()
    with pytest.raises(DataError, match="none of the 4 images reads"):
        examples[(0, False)]


def test_a_broken_image_is_replaced_only_by_one_of_its_group(tmp_path):
    """With aspect buckets a stand-in of another bucket would not stack into the step's batch."""
    folder = write_folder(tmp_path / "data", [line(f"{i:04d}.png", f"caption {i}") for i in range(4)])
    rows = clean_rows(load_rows(folder), "image", "text", 8, None, "skip", None, print)
    groups = ["a", "b", "b", "a"]  # row 1's group holds row 2; row 0's holds row 3
    examples = TrainingExamples(rows, "image", ImageTransform(8), torch.zeros(4, 3), log=print, groups=groups)
    expected = examples[(3, False)]["pixels"]
    (folder / "0000.png").write_bytes(b"broken")
    assert torch.equal(examples[(0, False)]["pixels"], expected)  # row 3, not row 1 (the next one)
    (folder / "0003.png").unlink()
    with pytest.raises(DataError, match="none of the 2 images reads"):
        examples[(0, False)]
    assert examples[(1, False)]["pixels"].shape == (3, 8, 8)  # the other group still trains


# ---- 8: metadata ----------------------------------------------------------------------------------


@pytest.fixture
def bad_metadata(tmp_path):
    lines = [
        line("0000.png", "a red circle"),
        line("0001.png", 42),  # a number: datasets raises ArrowInvalid for the whole file
        line("0002.png", ["two", "captions"]),  # a list where the others are text: ArrowInvalid too
        b'{"file_name": "0003.png", "text": "caf\xe9"}',  # Latin-1, not UTF-8: UnicodeDecodeError
        b'{"file_name": "0003.png", "text": ',  # cut off
        line("0003.png", "a blue square"),
        line("0000.png", "the first image again"),  # a duplicate file name
    ]
    return write_folder(tmp_path / "data", lines)


def test_bad_metadata_lines_are_a_data_error_naming_file_and_line(bad_metadata):
    with pytest.raises(Exception) as raw:  # the fault: datasets alone fails on the whole file
        datasets.load_dataset("imagefolder", data_dir=str(bad_metadata), split="train")
    assert not isinstance(raw.value, DataError)
    with pytest.raises(DataError, match="4 rows of metadata cannot be read") as error:
        load_rows(bad_metadata)
    message = str(error.value)
    for number, what in [
        (2, "is a number (42)"),
        (3, "is a list where"),
        (4, "not UTF-8"),
        (5, "malformed JSON"),
    ]:
        assert f"metadata.jsonl line {number}: " in message and what in message, (number, message)
    assert "bad_data to skip" in message


def test_with_bad_data_skip_bad_lines_are_skipped_and_listed_and_duplicates_listed(bad_metadata, tmp_path):
    rows, logs, report = load_rows(bad_metadata, bad_data="skip"), [], tmp_path / "bad_files.txt"
    kept = clean_rows(rows, "image", "text", 8, None, "skip", report, logs.append)
    assert kept["text"] == ["a red circle", "a blue square", "the first image again"]
    assert kept.column_names == ["image", "text"]
    listed = [entry.split("\t") for entry in report.read_text().splitlines()]
    skipped = {name.rsplit(" ", 1)[-1] for name, _, action in listed if action == "skipped"}
    assert skipped == {"2", "3", "4", "5"}  # the line numbers
    (duplicate,) = [(n, p, a) for n, p, a in listed if a.startswith("kept")]
    assert duplicate[0].endswith("line 7") and duplicate[1].endswith("line 1") and "twice" in duplicate[2]
    assert "4 unreadable metadata rows (skipped)" in logs[0] and "1 rows naming an image" in logs[0]


def test_csv_metadata_with_bad_bytes_or_fields_names_the_lines(tmp_path):
    folder = write_folder(tmp_path / "data", [])
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_bytes(
        b'file_name,text\n0000.png,"a caption\nover two lines"\n0001.png,caf\xe9\n0002.png,a,b\n0003.png,ok\n'
    )
    with pytest.raises(DataError, match="2 rows") as error:
        load_rows(folder)
    assert "metadata.csv line 4: not UTF-8" in str(error.value)
    assert "metadata.csv line 5: 3 fields where the header has 2" in str(error.value)
    rows = load_rows(folder, bad_data="skip")
    kept = clean_rows(rows, "image", "text", 8, None, "skip", None, print)
    assert kept["text"] == ["a caption\nover two lines", "ok"]


def test_exif_orientation_is_applied_to_the_pixels_and_the_header_size():
    array = np.zeros((2, 4, 3), np.uint8)  # stored 4 wide, 2 high; the left column white
    array[:, 0] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view": a phone held upright
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", exif=exif)
    data = buffer.getvalue()
    shown = np.asarray(decode_image(data))
    assert shown.shape == (4, 2, 3) and image_size(data) == (2, 4)  # upright: 2 wide, 4 high
    assert (shown[0] == 255).all() and (shown[1:] == 0).all()  # the white column is now the top row


# ---- 9: containment ------------------------------------------------------------------------------


@pytest.fixture
def table_outside(tmp_path):
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.png").write_bytes(png(np.full((8, 8, 3), 7, np.uint8)))
    folder = write_folder(tmp_path / "data", [], count=1)
    (folder / "link.png").symlink_to(tmp_path / "outside" / "secret.png")
    secret = str(tmp_path / "outside" / "secret.png")
    rows = [("0000.png", "mine"), ("../outside/secret.png", "up"), (secret, "abs"), ("link.png", "link")]
    (folder / "data.jsonl").write_text("".join(json.dumps({"image": p, "text": t}) + "\n" for p, t in rows))
    return folder / "data.jsonl"


def test_a_table_reads_no_file_outside_its_folder_unless_allowed(table_outside, tmp_path):
    with pytest.raises(DataError, match="3 rows") as error:
        load_rows(table_outside)
    assert str(error.value).count("is outside the data folder") == 3 and "allow_outside_paths" in str(
        error.value
    )
    rows = load_rows(table_outside, bad_data="skip")
    kept = clean_rows(rows, "image", "text", 8, None, "skip", None, print)
    assert kept["text"] == ["mine"]
    allowed = load_rows(table_outside, allow_outside=True)
    assert allowed["text"] == ["mine", "up", "abs", "link"]
    assert image_bytes(allowed[1]["image"]) == (tmp_path / "outside" / "secret.png").read_bytes()


def test_fifos_devices_and_oversized_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # the fault: reading it blocked start-up forever
    signal.alarm(20)  # a hang fails the test instead of stalling the suite
    try:
        why, _ = check_image({"path": str(fifo), "bytes": None}, 8)
        assert "is a FIFO, not a regular file" in why
        why, _ = check_image({"path": "/dev/zero", "bytes": None}, 8)  # the fault: grew without bound
        assert "not a regular file" in why
    finally:
        signal.alarm(0)
    big = tmp_path / "big.png"
    big.write_bytes(png(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(DataError, match="over the limit of 100"):
        read_file(big, max_bytes=100)
    assert read_file(big) == big.read_bytes()


# ---- 10: decoding bombs ---------------------------------------------------------------------------


def png_header_only(width: int, height: int, bit_depth: int = 16) -> bytes:
    """A PNG that declares width x height grayscale pixels and holds one compressed row of them."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    row = zlib.compress(b"\0" * (1 + width * bit_depth // 8))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", row) + chunk(b"IEND", b"")


def test_an_image_declaring_too_many_pixels_is_refused_from_its_header(monkeypatch):
    bomb = png_header_only(13000, 13000)  # 16-bit: decoded 338 MB, and 4.6 GB through float64 before
    assert len(bomb) < 100_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self) or pytest.fail("decoded"))
    why, _ = check_image({"bytes": bomb, "path": None}, resolution=32)
    assert why.startswith("too many pixels (13000x13000") and "max_image_pixels" in why and not decoded
    with pytest.raises(DataError, match="too many pixels"):
        ImageTransform(32)(bomb, 0)
    # The limit follows the training resolution (8x its side, at least 4096^2) and can be raised.
    assert pixel_limit(32) == FLOOR_PIXELS and pixel_limit(2048) == 64 * 2048**2 > 13000**2
    assert pixel_limit(32, max_pixels=13000**2) == 13000**2
    monkeypatch.undo()
    real = {"bytes": png(np.zeros((200, 300), np.uint8)), "path": None}
    assert check_image(real, 32, max_pixels=300 * 200 - 1)[0].startswith("too many pixels (300x200")
    assert check_image(real, 32, max_pixels=300 * 200) == (None, "converted from L")


def test_16_bit_images_decode_in_integers_without_float64_copies():
    values = np.random.default_rng(0).integers(0, 65536, (1024, 1024), dtype=np.uint16)
    data = png(values)
    tracemalloc.start()
    image = decode_image(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # float64 took 18 bytes a pixel (PIL's 16 bits, then v and v / 257 in float64); now 4 to 5: PIL's
    # raw bytes (joined from chunks) and the 8-bit result, converted about 64k pixels at a time
    assert peak < 5 * values.size, peak
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)  # round half up, as the float path did
    assert np.array_equal(np.asarray(image)[..., 0], expected)
