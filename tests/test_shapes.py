import json
import random

import numpy as np
import pytest
from PIL import Image

from sdlite.data.shapes import (
    PALETTE,
    SHAPES,
    ShapeSpec,
    allowed_pairs,
    draw,
    read_specs,
    sample_specs,
    write_dataset,
)
from sdlite.fidelity import analyse_image, matches


def read_folder(folder):
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    return [(Image.open(folder / r["file_name"]), r["text"]) for r in rows]


def test_captions_match_their_pixels_and_shuffled_captions_do_not(tmp_path):
    write_dataset(tmp_path, count=300, seed=0)
    rows = read_folder(tmp_path)
    analyses = [analyse_image(image) for image, _ in rows]
    captions = [text for _, text in rows]
    right = np.mean([matches(c, a, 32) for c, a in zip(captions, analyses)])
    random.Random(0).shuffle(captions)
    shuffled = np.mean([matches(c, a, 32) for c, a in zip(captions, analyses)])
    assert right == 1.0
    # Chance is about 1/6 colours x 1/3 shapes, less where a size word must match too.
    assert shuffled < 0.15


def test_images_are_one_flat_colour_on_the_background(tmp_path):
    write_dataset(tmp_path, count=20, seed=3)
    for (image, text), spec in zip(read_folder(tmp_path), read_specs(tmp_path)):
        colours = {tuple(c) for c in np.asarray(image).reshape(-1, 3)}
        assert colours == {(255, 255, 255), PALETTE[spec.colour]}  # no anti-aliased in-between pixels
        assert text == spec.caption


def test_exclude_leaves_out_a_pair_but_keeps_its_colour_and_shape(tmp_path):
    write_dataset(tmp_path, count=400, seed=0, exclude=["red circle"])
    specs = read_specs(tmp_path)
    pairs = {(s.colour, s.shape) for s in specs}
    assert ("red", "circle") not in pairs
    assert ("red", "square") in pairs and ("blue", "circle") in pairs
    assert not any("red circle" in text for _, text in read_folder(tmp_path))


def test_exclude_takes_colours_shapes_and_plurals():
    pairs = allowed_pairs(exclude=["green", "triangles", "blue square"])
    assert all(c != "green" and s != "triangle" for c, s in pairs)
    assert ("blue", "square") not in pairs and ("blue", "circle") in pairs
    assert allowed_pairs(colours=["red"], shapes=["circle", "square"]) == [
        ("red", "circle"),
        ("red", "square"),
    ]
    with pytest.raises(ValueError, match="neither a colour"):
        allowed_pairs(exclude=["pink circle"])
    with pytest.raises(ValueError, match="no colour-shape pair"):
        allowed_pairs(colours=["red"], exclude=["red"])


def test_same_seed_same_data_other_seed_other_data(tmp_path):
    a, b, c = (write_dataset(tmp_path / n, count=30, seed=s) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    assert (a / "metadata.jsonl").read_bytes() == (b / "metadata.jsonl").read_bytes()
    assert (a / "000012.png").read_bytes() == (b / "000012.png").read_bytes()
    assert read_specs(a) != read_specs(c)


def test_holdout_writes_a_test_split_that_differs_from_train(tmp_path):
    write_dataset(tmp_path, count=50, seed=0, holdout=20)
    train, test = read_specs(tmp_path / "train"), read_specs(tmp_path / "test")
    assert len(train) == 50 and len(test) == 20
    assert train[:20] != test
    assert (tmp_path / "test" / "metadata.jsonl").is_file()


@pytest.mark.parametrize("size", [32, 64])
def test_every_shape_fits_inside_the_image(size):
    for spec in sample_specs(200, seed=1, image_size=size):
        x0, y0, x1, y1 = spec.box
        assert 0 <= x0 and 0 <= y0 and x1 <= size and y1 <= size
        assert (draw(spec, size) != 255).any()


def test_size_words_name_only_clearly_small_or_large_shapes():
    specs = sample_specs(500, seed=0, size_word_prob=1.0)
    small = [s.half for s in specs if s.size_word == "small"]
    large = [s.half for s in specs if s.size_word == "large"]
    unnamed = [s.half for s in specs if s.size_word is None]
    assert max(small) < min(unnamed) <= max(unnamed) < min(large)
    assert ShapeSpec("red", "circle", 16, 16, 5, "small").caption == "a small red circle"
    assert ShapeSpec("red", "circle", 16, 16, 8, None).caption == "a red circle"
    assert set(SHAPES) == {s.shape for s in specs}
