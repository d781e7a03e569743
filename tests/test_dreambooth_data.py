"""DreamBooth's data: instance and class rows, batches holding both halves, the prior-preservation loss,
and topping the class folder up with generated images."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from sdlite.data.dataset import DataError
from sdlite.data.dreambooth import (
    apportion,
    class_image_sizes,
    class_images_needed,
    dreambooth_rows,
    generate_class_images,
    prior_preservation_loss,
)
from sdlite.data.samplers import StepSampler


def images(folder: Path, n: int, size=(16, 16)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", size, (i * 20, 0, 0)).save(folder / f"{i:03d}.png")


def test_instance_and_class_rows_carry_their_prompts_and_flags(tmp_path):
    images(tmp_path / "dog", 3)
    images(tmp_path / "dogs", 5)
    rows = dreambooth_rows(tmp_path / "dog", "a photo of sks dog", tmp_path / "dogs", "a photo of a dog")
    assert rows["text"] == ["a photo of sks dog"] * 3 + ["a photo of a dog"] * 5
    assert rows["is_prior"] == [False] * 3 + [True] * 5
    assert Path(rows[0]["image"]["path"]).parent.name == "dog"
    alone = dreambooth_rows(tmp_path / "dog", "a photo of sks dog")
    assert len(alone) == 3 and not any(alone["is_prior"])


def test_missing_instance_images_or_class_prompt_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        dreambooth_rows(tmp_path / "nothing", "a photo of sks dog")
    images(tmp_path / "dog", 1)
    with pytest.raises(DataError, match="without class_prompt"):
        dreambooth_rows(tmp_path / "dog", "sks dog", tmp_path / "dogs")
    with pytest.raises(DataError, match="generate them first"):
        dreambooth_rows(tmp_path / "dog", "sks dog", tmp_path / "dogs", "a dog")


def pairs(instances=4, classes=6, batch=2, processes=1, rank=0, accumulation=1, start=0, steps=20, **kw):
    return StepSampler(instances + classes, batch, seed=1, max_steps=steps, start_step=start,
                       num_processes=processes, process_index=rank, accumulation_steps=accumulation,
                       class_rows=list(range(instances, instances + classes)), **kw)  # fmt: skip


def test_every_micro_batch_holds_instances_then_as_many_class_images():
    s = pairs(batch=2, processes=2, accumulation=2)
    assert s.global_batch == 16
    for batch in s:
        assert len(batch) == 4
        assert [row >= 4 for row, _ in batch] == [False, False, True, True]
    seen = {row for step in range(3) for row, _ in s.step_items(step) if row >= 4}
    assert seen == set(range(4, 10))  # the class images are all visited


def test_class_draws_resume_exactly_and_split_disjointly_over_processes():
    full = list(pairs(steps=12))
    assert list(pairs(start=5, steps=12)) == full[5:]
    a, b = list(pairs(processes=2, rank=0, steps=6)), list(pairs(processes=2, rank=1, steps=6))
    for x, y in zip(a, b):
        assert not {r for r, _ in x[2:]} & {r for r, _ in y[2:]}  # class halves: different images


def test_an_item_takes_the_same_random_draws_however_its_step_is_split():
    def draws_of_items(**split) -> dict:
        """(step, item, class?) -> the places of its random draws in the step, over all processes."""
        out = {}
        for rank in range(split.get("processes", 1)):
            s = pairs(rank=rank, steps=3, **split)
            for step in range(3):
                items = s.step_items(step)
                for a in range(s.accumulation_steps):
                    for item, place in zip(items[s.positions(a)], s.draw_positions(a).tolist()):
                        out.setdefault((step, item, place >= s.global_batch // 2), []).append(place)
        return out

    one = draws_of_items(batch=4)
    assert draws_of_items(batch=2, processes=2) == one == draws_of_items(batch=1, processes=2, accumulation=2)


def test_class_images_follow_the_steps_bucket_or_the_missing_bucket_is_named():
    buckets = [0, 0, 1, 1, 0, 1, 1]
    s = StepSampler(7, 1, seed=0, max_steps=8, buckets=buckets, class_rows=[4, 5, 6])
    for step in range(8):
        (instance, _), (prior, _) = s.step_items(step)
        assert (instance >= 2) == (prior >= 5)  # bucket 1: rows 2, 3 and class rows 5, 6
    keyed = StepSampler(7, 1, seed=0, max_steps=8, buckets=buckets, class_rows=[4, 5, 6], caption_keys=True)
    assert all(len(item) == 4 for item in keyed.step_items(3))
    with pytest.raises(DataError, match=r"buckets \[1\] hold instance images but no class images"):
        StepSampler(5, 1, seed=0, max_steps=8, buckets=buckets[:5], class_rows=[4])


def test_the_prior_loss_is_the_instance_mean_plus_the_weighted_class_mean():
    losses = torch.tensor([1.0, 3.0, 10.0, 20.0, 30.0])
    flags = torch.tensor([False, False, True, True, True])
    loss, instance, prior = prior_preservation_loss(losses, flags, prior_loss_weight=0.5)
    assert instance.item() == 2.0 and prior.item() == 20.0 and loss.item() == 2.0 + 0.5 * 20.0
    only, _, _ = prior_preservation_loss(losses[:2], flags[:2], 0.5)
    assert only.item() == 2.0


def test_class_images_are_topped_up_with_captions_and_a_rerun_makes_none(tmp_path):
    folder = tmp_path / "class"
    images(folder, 2)
    assert class_images_needed(folder, 5) == 3 and class_images_needed(tmp_path / "none", 4) == 4
    calls = []

    def make(prompts, seeds, size):
        assert size is None  # no sizes given: the model's
        calls.append(list(seeds))
        return [Image.new("RGB", (16, 16), (s % 256, 0, 0)) for s in seeds]

    written = generate_class_images(folder, "a photo of a dog", 5, make, batch_size=2, seed=3)
    assert [p.name for p in written] == ["class_00000.png", "class_00001.png", "class_00002.png"]
    assert [len(c) for c in calls] == [2, 1]
    assert all(p.with_suffix(".txt").read_text() == "a photo of a dog\n" for p in written)
    assert class_images_needed(folder, 5) == 0
    assert generate_class_images(folder, "a photo of a dog", 5, make) == [] and len(calls) == 2
    assert not list(folder.glob(".*"))  # no temporary file left


def test_apportion_splits_in_proportion_with_one_each_first():
    assert apportion(8, [3, 1]) == [6, 2]
    assert apportion(7, [2, 0, 1]) == [4, 0, 3]  # remainders: 5*2/3 -> 3 r 1, 5*1/3 -> 1 r 2
    assert apportion(2, [1, 5, 1]) == [1, 1, 0]  # too few for one each: the largest first, then in order
    assert apportion(0, [3, 1]) == [0, 0] and apportion(3, [0, 0]) == [0, 0]


SQUARE, WIDE, TALL = (16, 16), (32, 8), (8, 32)


def test_class_image_sizes_follow_the_instance_buckets_less_what_the_folder_holds(tmp_path):
    images(tmp_path / "dog", 3, SQUARE)
    Image.new("RGB", (60, 14), (0, 0, 0)).save(tmp_path / "dog" / "wide.png")  # nearest 32x8
    buckets = [TALL, SQUARE, WIDE]
    # 8 wanted: the instances' 3:1 is 6 square and 2 wide (one each first, then 4:1 of the other 6)
    assert class_image_sizes(tmp_path / "dog", tmp_path / "none", buckets, 8) == [SQUARE] * 6 + [WIDE] * 2
    images(tmp_path / "dogs", 1, SQUARE)
    assert class_image_sizes(tmp_path / "dog", tmp_path / "dogs", buckets, 8) == [SQUARE] * 5 + [WIDE] * 2
    images(tmp_path / "tall", 4, TALL)  # 4 of a shape the subject lacks: the 4 to make go where they lack
    assert class_image_sizes(tmp_path / "dog", tmp_path / "tall", buckets, 8) == [SQUARE] * 3 + [WIDE]


def test_generated_class_images_take_their_sizes_one_size_a_batch_and_resume_alike(tmp_path):
    images(tmp_path / "dog", 2, SQUARE)
    images(tmp_path / "dog" / "wide", 1, WIDE)
    buckets = [TALL, SQUARE, WIDE]

    def make(prompts, seeds, size):
        calls.append((size, len(seeds)))
        if len(calls) > crash_after:
            raise KeyboardInterrupt("the machine went away")
        return [Image.new("RGB", size, (s % 256, 0, 0)) for s in seeds]

    def top_up(folder):
        sizes = class_image_sizes(tmp_path / "dog", folder, buckets, 6)
        return generate_class_images(folder, "a dog", 6, make, batch_size=3, seed=1, sizes=sizes)

    calls, crash_after = [], 99
    written = top_up(tmp_path / "whole")
    assert calls == [(SQUARE, 3), (SQUARE, 1), (WIDE, 2)]  # 4 square, 2 wide; a batch holds one size
    assert [Image.open(p).size for p in written] == [SQUARE] * 4 + [WIDE] * 2
    calls, crash_after = [], 1
    with pytest.raises(KeyboardInterrupt):
        top_up(tmp_path / "broken")
    assert len(list((tmp_path / "broken").glob("*.png"))) == 3
    calls, crash_after = [], 99
    top_up(tmp_path / "broken")
    assert calls == [(SQUARE, 1), (WIDE, 2)]  # what was left of the same plan
    for p in written:  # the same names, sizes and seeds (the red channel) as the uninterrupted run
        again = Image.open(tmp_path / "broken" / p.name)
        assert again.size == Image.open(p).size and again.getpixel((0, 0)) == Image.open(p).getpixel((0, 0))
    with pytest.raises(ValueError, match="2 sizes for the 3 class images"):
        generate_class_images(tmp_path / "more", "a dog", 3, make, sizes=[SQUARE, WIDE])
