"""Caption folders (a .txt beside each image), N_name repeat folders, and per-draw caption handling."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlite.data.captions import (
    CAPTION_PROBLEM,
    CaptionOptions,
    DrawnCaptions,
    append_problems,
    caption_rows,
    draw_caption,
    expand_repeats,
    folder_repeats,
    is_caption_folder,
)
from sdlite.data.cleaning import clean_rows
from sdlite.data.dataset import DataError, image_bytes


def image(path: Path, size=(12, 8), color=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_captions_and_repeats_are_read_from_files_and_folder_names(tmp_path):
    image(tmp_path / "10_mychar" / "a.png")
    (tmp_path / "10_mychar" / "a.txt").write_text("mychar, red hair\n")
    image(tmp_path / "10_mychar" / "deep" / "b.jpg")
    (tmp_path / "10_mychar" / "deep" / "b.caption").write_text("\n  mychar, smiling  \n")
    image(tmp_path / "3_style" / "c.png")
    (tmp_path / "3_style" / "c.txt").write_text("a painting")
    image(tmp_path / "plain" / "d.png")
    (tmp_path / "plain" / "d.txt").write_text("a plain photo")
    assert is_caption_folder(tmp_path)
    rows, problems = caption_rows(tmp_path)
    got = {Path(r["image"]["path"]).name: (r["text"], r["repeats"]) for r in rows}
    assert got == {
        "a.png": ("mychar, red hair", 10),
        "b.jpg": ("mychar, smiling", 10),  # nested below 10_mychar: its count
        "c.png": ("a painting", 3),
        "d.png": ("a plain photo", 1),
    }
    assert problems == []
    assert image_bytes(rows[0]["image"]) == (tmp_path / "10_mychar" / "a.png").read_bytes()
    # The rows go through the existing check unchanged (same shape as load_rows').
    assert len(clean_rows(rows, "image", "text", 8, log=lambda _: None)) == 4


def test_a_folder_with_metadata_is_not_a_caption_folder(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    assert not is_caption_folder(tmp_path)


def test_bad_caption_files_and_folders_are_listed_with_what_was_done(tmp_path):
    image(tmp_path / "1_ok" / "empty.png")
    (tmp_path / "1_ok" / "empty.txt").write_text("  \n")
    image(tmp_path / "1_ok" / "uncaptioned.png")
    (tmp_path / "1_ok" / "orphan.txt").write_text("no image")
    image(tmp_path / "0_off" / "zero.png")
    (tmp_path / "0_off" / "zero.txt").write_text("x")
    image(tmp_path / "1.5_odd" / "odd.png")
    (tmp_path / "1.5_odd" / "odd.txt").write_text("odd")
    rows, problems = caption_rows(tmp_path)
    kept = {Path(r["image"]["path"]).name: (r["text"], r["repeats"]) for r in rows}
    assert kept == {"empty.png": ("", 1), "uncaptioned.png": ("", 1), "odd.png": ("odd", 1)}
    why = {Path(r["image"]["path"]).name: r[CAPTION_PROBLEM] for r in rows}  # listed by clean_rows
    assert why == {"empty.png": "empty caption file", "uncaptioned.png": "no caption file (.txt or .caption)",
                   "odd.png": None}  # fmt: skip
    listed = {Path(name).name: (problem, done) for name, problem, done in problems}
    assert "empty.png" not in listed and "uncaptioned.png" not in listed
    assert listed["orphan.txt"] == ("caption file without an image of the same name", "ignored")
    assert "0 times" in listed["zero.png"][0] and listed["zero.png"][1].startswith("skipped")
    assert "not a whole repeat count" in listed["odd.png"][0]
    report = tmp_path / "out" / "bad_files.txt"
    append_problems(report, problems)
    lines = report.read_text().splitlines()
    assert len(lines) == len(problems) and all(len(line.split("\t")) == 3 for line in lines)


def test_a_row_without_a_caption_is_listed_once_saying_why_and_what_was_done(tmp_path):
    """bad_files.txt as training writes it (clean_rows' report, then caption_rows' problems appended):
    one line per row, with the caption file's own problem, not a second generic "no caption"."""
    image(tmp_path / "uncaptioned.png")
    image(tmp_path / "empty.png")
    (tmp_path / "empty.txt").write_text("\n \n")
    image(tmp_path / "latin1.png")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    image(tmp_path / "long.png")
    (tmp_path / "long.txt").write_text("a red square\nsecond thoughts\n")
    image(tmp_path / "fine.png")
    (tmp_path / "fine.txt").write_text("a fine caption")
    (tmp_path / "orphan.txt").write_text("no image")
    rows, problems = caption_rows(tmp_path)
    report, logs = tmp_path / "out" / "bad_files.txt", []
    kept = clean_rows(rows, "image", "text", 8, None, "skip", report, logs.append)
    append_problems(report, problems)
    lines = [line.split("\t") for line in report.read_text().splitlines()]
    listed = [(Path(name).name, problem, done) for name, problem, done in lines]
    assert sorted(listed) == [
        ("empty.png", "empty caption file", "kept, trained with the empty caption"),
        ("latin1.png", "caption file is not UTF-8 text", "kept, trained with the empty caption"),
        ("long.png", "caption file has 2 lines (the first is read)", "kept"),
        ("orphan.txt", "caption file without an image of the same name", "ignored"),
        ("uncaptioned.png", "no caption file (.txt or .caption)", "kept, trained with the empty caption"),
    ]
    assert "3 rows without a caption" in logs[0]
    assert kept.column_names == ["image", "text", "repeats"]  # the problem column goes no further


def test_folder_names_give_repeat_counts_or_problems():
    assert folder_repeats("10_mychar") == (10, None)
    assert folder_repeats("my_photos") == (1, None)  # an ordinary name, not a count
    assert folder_repeats("0_x")[0] == 0 and folder_repeats("0_x")[1]
    assert folder_repeats("ten5_x") == (1, "folder 'ten5_x': 'ten5' is not a whole repeat count")


def test_a_folder_whose_only_images_repeat_zero_times_is_a_clear_error(tmp_path):
    image(tmp_path / "0_off" / "a.png")
    with pytest.raises(DataError, match="holds no image to train"):
        caption_rows(tmp_path)


def test_repeats_expand_to_items():
    assert expand_repeats([2, 0, 1]) == [0, 0, 2]


def test_shuffle_keeps_the_first_tags_and_is_a_function_of_seed_epoch_item():
    caption = "sks, dog, grass, sun, red collar, park, tree, ball"
    options = CaptionOptions(shuffle_caption=True, keep_tokens=2)
    draws = {draw_caption(caption, options, 0, epoch, item) for epoch in range(3) for item in range(5)}
    assert len(draws) > 5  # the order changes from draw to draw
    for text in draws:
        tags = text.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags) == sorted(caption.split(", "))
    assert draw_caption(caption, options, 0, 1, 3) == draw_caption(caption, options, 0, 1, 3)
    assert draw_caption(caption, options, 1, 1, 3) != draw_caption(caption, options, 0, 1, 3)
    assert draw_caption(caption, CaptionOptions(), 0, 1, 3) == caption  # off: unchanged


def test_tag_dropout_leaves_out_tags_at_its_rate_never_the_kept_ones_and_is_drawn_per_item():
    caption = "sks, dog, grass, sun, red collar, park, tree, ball"
    options = CaptionOptions(keep_tokens=1, tag_dropout=0.25)
    draws = [draw_caption(caption, options, 0, epoch, item) for epoch in range(4) for item in range(100)]
    tags = [text.split(", ") for text in draws]
    assert all(t[0] == "sks" for t in tags)  # keep_tokens: never dropped
    order = caption.split(", ")
    assert all(t == [tag for tag in order if tag in t] for t in tags)  # what stays keeps its order
    kept = sum(len(t) - 1 for t in tags) / (7 * len(tags))
    assert 0.72 < kept < 0.78  # 2,800 tags at 0.75
    assert draw_caption(caption, options, 0, 2, 7) == draws[2 * 100 + 7]
    assert [draw_caption(caption, options, 1, 0, i) for i in range(20)] != draws[:20]
    assert options.per_draw and not CaptionOptions(tag_dropout=0.0).per_draw
    # with a shuffle: the same order as the shuffle alone draws, less the dropped tags
    both, alone = CaptionOptions(True, 1, tag_dropout=0.5), CaptionOptions(True, 1)
    for item in range(10):
        shuffled = draw_caption(caption, alone, 0, 0, item).split(", ")
        kept = draw_caption(caption, both, 0, 0, item).split(", ")
        assert kept == [t for t in shuffled if t in kept]


def test_tag_dropout_on_the_words_of_a_sentence_caption():
    options = CaptionOptions(separator=" ", tag_dropout=0.5)
    draws = {draw_caption("a small red circle", options, 0, 0, item) for item in range(64)}
    assert "" in draws and "a small red circle" in draws and "red circle" in draws  # words, single spaces
    assert all(
        text == " ".join(w for w in "a small red circle".split() if w in text.split()) for text in draws
    )


def test_the_caption_prefix_is_the_first_tag_and_never_moves():
    options = CaptionOptions(shuffle_caption=True, caption_prefix="ohwx")
    for item in range(10):
        assert draw_caption("a, b, c, d", options, 0, 0, item).startswith("ohwx, ")
    assert draw_caption("", options, 0, 0, 0) == "ohwx"
    assert options.per_draw and not CaptionOptions(caption_prefix="ohwx").per_draw  # prefix alone: fixed


def test_drawn_captions_retokenize_each_draw():
    class Examples(torch.utils.data.Dataset):
        def __getitem__(self, item):
            return {"pixels": torch.zeros(1), "embeds": torch.zeros(1)}

    tokenize = lambda texts: torch.tensor([[len(t.split(", ")[0])] for t in texts])
    drawn = DrawnCaptions(Examples(), ["a, bb, ccc, dddd"], tokenize, CaptionOptions(shuffle_caption=True), 0)
    firsts = {int(drawn[(0, False, 0, item)]["input_ids"][0]) for item in range(12)}
    assert len(firsts) > 1 and "embeds" not in drawn[(0, False, 0, 0)]
