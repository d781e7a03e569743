"""The draw order of every kind of run, pinned: ``StepSampler`` (sdlite/data/samplers.py) with each of its
options gives the items the three samplers it replaced gave (plain epochs, aspect buckets with repeats,
DreamBooth's prior pairs), so that a run's draws, and so its weights, stay as they were. The constants
were recorded from those samplers: 10 rows, batch 2, seed 3, steps 0, 1, 2, 7 and 23."""

import datasets

from sdlite.data.captions import CaptionOptions
from sdlite.data.dataset import ImageTransform
from sdlite.data.samplers import StepSampler
from training.sampling import DataLayout

BUCKETS = [0, 1, 0, 1, 1, 0, 2, 0, 1, 0]
REPEATS = [1, 3, 1, 2, 1, 1, 2, 1, 1, 1]
CLASS_ROWS = [6, 7, 8, 9]
STEPS = (0, 1, 2, 7, 23)


def recorded(**options) -> list[list[tuple]]:
    s = StepSampler(10, 2, seed=3, max_steps=40, **options)
    return [s.step_items(k) for k in STEPS]


def test_plain_epochs_keep_their_order():
    assert recorded(random_flip=True) == [
        [(6, True), (7, True)], [(0, True), (5, False)], [(9, True), (2, False)], [(9, False), (2, False)],
        [(0, False), (5, False)],
    ]  # fmt: skip


def test_repeats_keep_their_order():
    assert recorded(random_flip=True, repeats=REPEATS) == [
        [(2, True), (1, True)], [(0, True), (5, False)], [(8, True), (1, False)], [(1, False), (6, False)],
        [(4, False), (3, False)],
    ]  # fmt: skip


def test_captions_drawn_per_draw_keep_their_order_and_keys():
    assert recorded(caption_keys=True) == [
        [(3, False, 0, 3), (5, False, 0, 5)], [(0, False, 0, 0), (1, False, 0, 1)],
        [(6, False, 0, 6), (2, False, 0, 2)], [(7, False, 1, 7), (3, False, 1, 3)],
        [(8, False, 4, 8), (9, False, 4, 9)],
    ]  # fmt: skip


def test_aspect_buckets_with_repeats_keep_their_order():
    assert recorded(random_flip=True, repeats=REPEATS, buckets=BUCKETS) == [
        [(2, True), (7, True)], [(6, True), (6, False)], [(7, True), (9, False)], [(1, False), (3, False)],
        [(3, False), (1, False)],
    ]  # fmt: skip


def test_dreambooth_prior_pairs_keep_their_order():
    assert recorded(random_flip=True, class_rows=CLASS_ROWS) == [
        [(3, True), (1, True), (9, True), (6, False)], [(0, True), (4, False), (7, True), (8, True)],
        [(2, True), (5, False), (8, True), (6, True)], [(1, False), (5, False), (8, True), (9, False)],
        [(2, False), (0, False), (6, False), (8, True)],
    ]  # fmt: skip


def test_bucketed_dreambooth_with_caption_keys_keeps_its_order():
    assert recorded(caption_keys=True, buckets=BUCKETS, class_rows=CLASS_ROWS) == [
        [(3, False, 0, 3), (1, False, 0, 1), (8, False, 0, 0), (8, False, 0, 0)],
        [(2, False, 0, 2), (0, False, 0, 0), (7, False, 1, 0), (9, False, 1, 1)],
        [(0, False, 0, 0), (5, False, 0, 5), (7, False, 2, 0), (9, False, 2, 1)],
        [(3, False, 1, 3), (4, False, 1, 4), (8, False, 7, 0), (8, False, 7, 0)],
        [(2, False, 5, 2), (0, False, 5, 0), (7, False, 23, 0), (9, False, 23, 1)],
    ]  # fmt: skip


def test_a_caption_folder_without_repeat_folders_draws_plain_epochs():
    """Repeats of one each change nothing: the layout leaves them out, so the run keeps plain epochs."""
    layout = DataLayout(ImageTransform(32), 4, 4, CaptionOptions())
    layout.read(datasets.Dataset.from_dict({"repeats": [1, 1, 1]}), ["a", "b", "c"], "image")
    assert layout.repeats is None and layout.num_rows == 3
    layout.read(datasets.Dataset.from_dict({"repeats": [1, 2, 1]}), ["a", "b", "c"], "image")
    assert layout.repeats == [1, 2, 1]
