"""Aspect-ratio buckets: sizes, assignment, the fit into a bucket, the one-bucket-per-step sampler."""

import io
import json
import math
from types import SimpleNamespace

import datasets
import pytest
import torch
from PIL import Image

from sdlite.data.buckets import (
    BucketTransform,
    assign_bucket,
    bucket_counts,
    bucket_multiple,
    bucket_rows,
    bucket_summary,
    bucket_transform,
    cache_bucket_latents,
    covering_size,
    image_buckets,
    image_sizes,
    make_buckets,
    one_bucket_warning,
    write_buckets_json,
)
from sdlite.data.cache import TensorCache, latent_key
from sdlite.data.dataset import TrainingExamples
from sdlite.data.samplers import StepSampler


def png(size, color=(10, 120, 240)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_buckets_have_about_the_pixels_of_the_square_and_sides_of_the_multiple():
    for resolution, multiple in ((512, 64), (1024, 64), (64, 16)):
        buckets = make_buckets(resolution, multiple)
        area = resolution**2
        assert (resolution, resolution) in buckets
        for w, h in buckets:
            assert w % multiple == 0 and h % multiple == 0
            assert resolution // 2 <= min(w, h) and max(w, h) <= 2 * resolution
            # The tallest multiple under the area: short of it by less than one strip `multiple` wide.
            assert area - multiple * max(w, h) < w * h <= area
            assert (h, w) in buckets
        ratios = [w / h for w, h in buckets]
        assert ratios == sorted(ratios) and ratios[0] <= 0.5 and ratios[-1] >= 2


def test_bucket_sides_are_multiples_of_the_vae_factor_whole_latent_pixels():
    # Was the factor x 8 (latent sides multiples of 8), a 32-pixel grid on the tiny model: one square
    # bucket for 3:2 photos at resolution 32. The U-Net needs no multiple (the next test).
    assert bucket_multiple({"block_out_channels": [128, 256, 512, 512]}) == 8  # SD and SDXL: factor 8
    assert bucket_multiple({"block_out_channels": [32, 64]}) == 2


@pytest.mark.parametrize("name", ["tiny", "tiny-sdxl"])
def test_the_unets_run_at_latent_sides_no_downsampling_divides(name):
    from diffusers import UNet2DConditionModel

    from sdlite.presets import get_preset

    config = get_preset(name).config("unet")
    unet = UNet2DConditionModel(**config).eval()
    extra = {}
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text and size/crop ids
        pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        extra["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
    for h, w in [(5, 7), (9, 6), (10, 6)]:  # 3 levels halve twice: none of these is a multiple of 4
        latents = torch.randn(1, config["in_channels"], h, w)
        with torch.no_grad():
            out = unet(latents, 10, torch.randn(1, 4, config["cross_attention_dim"]), **extra).sample
        assert out.shape == latents.shape


def test_a_bucket_step_off_the_vae_factor_is_refused_with_the_nearest_choices():
    vae = {"block_out_channels": [16, 32, 32]}  # factor 4
    with pytest.raises(ValueError, match="bucket_step 6 is not a multiple of 4, .* use 4 or 8"):
        bucket_transform(32, vae, step=6)
    assert bucket_transform(32, vae).step == 4 and bucket_transform(32, vae, step=8).step == 8


def test_the_default_step_is_kohyas_64_px_at_real_sizes_and_an_eighth_of_a_small_resolution():
    sd, tiny = {"block_out_channels": [128, 256, 512, 512]}, {"block_out_channels": [16, 32, 32]}
    assert bucket_transform(512, sd).step == 64 and bucket_transform(1024, sd).step == 64  # SD, SDXL
    assert bucket_transform(256, sd).step == 32  # an eighth of the resolution
    assert bucket_transform(32, tiny).step == 4 and bucket_transform(128, tiny).step == 16


def test_a_resolution_off_the_multiple_is_refused_with_the_nearest_choices():
    with pytest.raises(ValueError, match="choose 512 or 576"):
        make_buckets(520, 64)
    with pytest.raises(
        ValueError, match="resolution 32 is not a multiple of the bucket step 64.*choose 64, or a"
    ):
        make_buckets(32, 64)


def test_images_go_to_the_bucket_of_the_nearest_aspect_ratio():
    buckets = make_buckets(512, 64)
    for size in ((3000, 2000), (2000, 3000), (1920, 1080), (500, 500), (8, 8), (4000, 800)):
        w, h = buckets[assign_bucket(size, buckets)]
        best = min(abs(math.log(bw / bh) - math.log(size[0] / size[1])) for bw, bh in buckets)
        assert abs(math.log(w / h) - math.log(size[0] / size[1])) == best
    assert buckets[assign_bucket((500, 500), buckets)] == (512, 512)


def test_an_image_fit_into_its_bucket_keeps_its_whole_width_or_height():
    transform = BucketTransform(64, tuple(make_buckets(64, 16)))
    for size in ((300, 200), (200, 300), (97, 31), (8, 8), (640, 360), (33, 100)):
        bucket = transform.bucket(size)
        resized = covering_size(size, bucket)
        assert resized[0] >= bucket[0] and resized[1] >= bucket[1]
        assert resized[0] == bucket[0] or resized[1] == bucket[1]  # one side whole: no cut beyond the bucket
        assert abs(resized[0] / resized[1] - size[0] / size[1]) < 0.05 * size[0] / size[1] + 1 / min(resized)
        image, original, (top, left) = transform.fit(Image.new("RGB", size), index=0)
        assert image.size == bucket and original == size
        assert top == (resized[1] - bucket[1]) // 2 and left == (resized[0] - bucket[0]) // 2
        pixels = transform(png(size), index=0, flip=True)
        assert pixels.shape == (3, bucket[1], bucket[0]) and pixels.min() >= -1 and pixels.max() <= 1


def test_random_crops_are_a_function_of_seed_and_index():
    transform = BucketTransform(64, tuple(make_buckets(64, 16)), random_crop=True, seed=3)
    size = (500, 100)  # 5:1, wider than any bucket (4:1 at most): a real cut along the width
    boxes = {transform.crop_box(size, i) for i in range(20)}
    assert len(boxes) > 1 and transform.crop_box(size, 5) == transform.crop_box(size, 5)
    left, top, right, bottom = transform.crop_box(size, 5)
    assert (bottom - top, right - left) == (32, 128)  # the 4:1 bucket; SDXL's time ids: test_train_sdxl.py


def sampler(buckets, batch=2, processes=1, rank=0, accumulation=1, start=0, steps=40, **kw):
    return StepSampler(len(buckets), batch, seed=7, max_steps=steps, start_step=start,
                       num_processes=processes, process_index=rank, accumulation_steps=accumulation,
                       buckets=buckets, **kw)  # fmt: skip


BUCKETS = [0] * 9 + [1] * 5 + [2] * 1  # bucket 2 holds one image


def test_every_step_draws_from_one_bucket_and_each_epoch_sees_every_image():
    s = sampler(BUCKETS, batch=2, processes=2)
    G = s.global_batch
    assert s.steps_per_epoch == 3 + 2 + 1  # ceil(9/4) + ceil(5/4) + ceil(1/4)
    seen = set()
    for step in range(s.steps_per_epoch):
        rows = [row for row, _ in s.step_items(step)]
        assert len(rows) == G and len({BUCKETS[r] for r in rows}) == 1
        assert {BUCKETS[r] for r in rows} == {s.step_bucket(step)}
        seen.update(rows)
    assert seen == set(range(len(BUCKETS)))
    single = next(step for step in range(s.steps_per_epoch) if s.step_bucket(step) == 2)
    assert [row for row, _ in s.step_items(single)] == [14] * G  # the lone image repeated, not merged


def test_two_processes_take_disjoint_slices_of_the_same_bucket_per_step():
    one = [list(batch) for batch in sampler([0] * 16 + [1] * 16, batch=2, processes=2, rank=0, steps=12)]
    two = [list(batch) for batch in sampler([0] * 16 + [1] * 16, batch=2, processes=2, rank=1, steps=12)]
    whole = sampler([0] * 16 + [1] * 16, batch=4, steps=12)
    for step, (a, b) in enumerate(zip(one, two)):
        rows_a, rows_b = {r for r, _ in a}, {r for r, _ in b}
        assert not rows_a & rows_b
        assert {r // 16 for r in rows_a | rows_b} == {whole.step_bucket(step)}
        assert a + b == whole.step_items(step)  # the same global batch however it is split


def test_sampling_restarted_at_step_k_is_identical():
    full = list(sampler(BUCKETS, batch=2, accumulation=2, random_flip=True, steps=30))
    for k in (0, 4, 13):
        resumed = list(sampler(BUCKETS, batch=2, accumulation=2, random_flip=True, start=k, steps=30))
        assert resumed == full[2 * k :]
    assert any(flip for batch in full for _, flip in batch) and len(full) == 60


def test_epochs_differ_and_repeats_count_in_the_epoch():
    s = sampler([0, 0, 1], batch=1, repeats=[3, 1, 2], caption_keys=True)
    assert s.num_items == 6 and s.steps_per_epoch == 6
    epoch0 = [s.step_items(k)[0] for k in range(6)]
    assert sorted(r for r, *_ in epoch0) == [0, 0, 0, 1, 2, 2]
    assert sorted(item for *_, item in epoch0) == list(range(6)) and {e for _, _, e, _ in epoch0} == {0}
    epoch1 = [s.step_items(6 + k)[0][3] for k in range(6)]
    assert epoch1 != [i for *_, i in epoch0] and sorted(epoch1) == list(range(6))


def test_one_bucket_for_all_keeps_every_image_of_the_epoch():
    s = StepSampler(10, 4, seed=0, max_steps=3, buckets=[0] * 10)
    assert s.steps_per_epoch == 3
    assert sorted({r for k in range(3) for r, _ in s.step_items(k)}) == list(range(10))


def test_buckets_json_and_summary_count_images(tmp_path):
    buckets = make_buckets(64, 16)
    sizes = [(64, 64)] * 3 + [(100, 50)] * 2 + [(50, 100)]
    of_rows = [assign_bucket(s, buckets) for s in sizes]
    counts = bucket_counts(of_rows, buckets)
    assert counts == {"48x80": 1, "64x64": 3, "80x48": 2}
    write_buckets_json(tmp_path / "out" / "buckets.json", counts)
    assert json.loads((tmp_path / "out" / "buckets.json").read_text()) == counts
    line = bucket_summary(counts, global_batch=2)
    assert (
        "6 images in 3 buckets" in line and "64x64 3" in line and "1 with fewer" in line and "\n" not in line
    )


class TinyVAE(torch.nn.Module):
    """Stands in for AutoencoderKL: the posterior's mean is the 4x-pooled pixels."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.device, self.dtype, self.config = torch.device("cpu"), torch.float32, {"f": 4}

    def encode(self, pixels):
        mean = torch.nn.functional.avg_pool2d(pixels, 4) * self.scale
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=torch.ones_like(mean)))


def test_latents_cache_one_bucket_at_a_time_with_each_images_shape(tmp_path):
    sizes = [(64, 64), (100, 50), (64, 70), (50, 100), (120, 60)]
    rows = datasets.Dataset.from_dict({"image": [{"bytes": png(s), "path": None} for s in sizes]})
    rows = rows.cast_column("image", datasets.Image(decode=False))
    transform = BucketTransform(64, tuple(make_buckets(64, 16)))
    of_rows = image_buckets(rows, "image", transform)
    assert image_sizes(rows, "image") == sizes
    files, computed = cache_bucket_latents(TensorCache(tmp_path), rows, "image", transform, of_rows,
                                           TinyVAE(), flips=(False, True), batch_size=4)  # fmt: skip
    assert computed == 2 * len(sizes)
    for size, (plain, flipped) in zip(sizes, files):
        w, h = transform.bucket(size)
        assert plain.load()["mean"].shape == (3, h // 4, w // 4) and flipped is not None
    again, computed = cache_bucket_latents(
        TensorCache(tmp_path), rows, "image", transform, of_rows, TinyVAE()
    )
    assert computed == 0 and [f[0] for f in again] == [f[0] for f in files]


def test_training_examples_through_a_data_loader_come_in_one_size_per_batch():
    sizes = [(64, 64), (100, 50), (64, 70), (50, 100), (120, 60), (30, 90)]
    rows = datasets.Dataset.from_dict({"image": [{"bytes": png(s), "path": None} for s in sizes]})
    rows = rows.cast_column("image", datasets.Image(decode=False))
    transform = BucketTransform(64, tuple(make_buckets(64, 16)))
    of_rows = image_buckets(rows, "image", transform)
    examples = TrainingExamples(rows, "image", transform, torch.zeros(len(sizes), 4, dtype=torch.long))
    s = StepSampler(len(of_rows), 2, seed=0, max_steps=6, random_flip=True, buckets=of_rows)
    loader = torch.utils.data.DataLoader(examples, batch_sampler=s)
    for step, batch in enumerate(loader):
        w, h = transform.buckets[s.step_bucket(step)]
        assert batch["pixels"].shape == (2, 3, h, w) and batch["input_ids"].shape == (2, 4)


def test_a_photo_that_clean_rows_accepts_at_the_resolution_fits_its_bucket():
    # 4100 x 4100 is over the 4096 x 4096 floor of decode_image, under pixel_limit(1024), the limit that
    # clean_rows checked: the transform must read it too, not fail at the first step that draws it.
    transform = BucketTransform(1024, tuple(make_buckets(1024, 64)))
    assert transform(png((4100, 4100)), 0).shape == (3, 1024, 1024)


def test_a_3_by_2_image_gets_a_non_square_bucket_at_the_default_step_on_a_32_pixel_model():
    vae = {"block_out_channels": [16, 32, 32]}  # the tiny preset's: factor 4, resolution 32
    fine, coarse = bucket_transform(32, vae), bucket_transform(32, vae, step=32)
    assert fine.bucket((48, 32)) == (40, 24) and fine.bucket((32, 48)) == (24, 40)
    assert coarse.buckets == ((32, 32),)  # the old grid: every image square
    warning = one_bucket_warning([(48, 32), (32, 48)], coarse, multiple=4)
    assert "all 2 images fell into one bucket, 32x32" in warning
    assert "0.67..1.50" in warning and "bucket_step (this model takes multiples of 4)" in warning
    assert one_bucket_warning([(48, 32), (32, 48)], fine, multiple=4) is None
    assert one_bucket_warning([(64, 64), (32, 32)], coarse, multiple=4) is None  # square images: nothing lost


def test_no_upscale_gives_each_image_a_bucket_no_larger_than_itself():
    transform = bucket_transform(64, {"block_out_channels": [16, 32, 32]}, step=8, no_upscale=True)
    sizes = [(50, 35), (40, 40), (300, 100), (64, 64), (3, 50)]
    transform, of_rows = bucket_rows(sizes, transform)
    # Under resolution² pixels: the size rounded down to the step; over it: scaled down to about
    # 64x64 pixels first (300x100 -> 110.9x36.9); a side under one step gets one step.
    assert [transform.buckets[b] for b in of_rows] == [(48, 32), (40, 40), (104, 32), (64, 64), (8, 48)]
    assert len(transform.buckets) == 5
    for size in sizes[:4]:  # the resize that covers the bucket never enlarges the image
        resized = transform.resized_size(size)
        assert resized[0] <= size[0] and resized[1] <= size[1]
    w, h = transform.bucket((50, 35))
    assert transform(png((50, 35)), 0).shape == (3, h, w)
    plain = bucket_transform(64, {"block_out_channels": [16, 32, 32]}, step=8)
    assert plain.bucket((50, 35)) == (72, 56)  # without no_upscale: enlarged to about 64x64 pixels


def test_cache_keys_differ_when_the_bucket_set_changes_an_images_pixels():
    vae = {"block_out_channels": [16, 32, 32]}
    transforms = [bucket_transform(32, vae), bucket_transform(32, vae, step=32),
                  bucket_transform(32, vae, no_upscale=True)]  # fmt: skip

    def key(transform, size):
        return latent_key("digest", transform.resolution, transform.crop_box(size, 0), False, "vae")

    assert [t.bucket((28, 20)) for t in transforms] == [(36, 28), (32, 32), (28, 20)]
    assert len({key(t, (28, 20)) for t in transforms}) == 3
    # An image whose bucket stays shares its entry: the pixels are the same.
    assert key(transforms[0], (32, 32)) == key(transforms[1], (32, 32))
    assert torch.equal(transforms[0](png((32, 32)), 0), transforms[1](png((32, 32)), 0))
