import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from sdlite.data import shards as shards_module
from sdlite.data.cache import (
    TensorCache,
    cache_latents,
    cache_text,
    fingerprint,
    latent_key,
    sample_latents,
    text_key,
    vae_moments,
)
from sdlite.data.dataset import ImageTransform, load_rows
from sdlite.latents import encode
from sdlite.presets import get_preset


def tiny_vae(seed=0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(**get_preset("tiny").config("vae")).eval()


def tiny_text_encoder(seed=0) -> CLIPTextModel:
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(**get_preset("tiny").config("text_encoder"))).eval()


def write_folder(root, count=4, seed=0):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"caption {i % 2}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_fill_computes_only_missing_entries_and_dedupes_keys(tmp_path):
    cache = TensorCache(tmp_path)
    calls = []

    def compute(positions):
        calls.append(list(positions))
        return {"x": torch.tensor(positions, dtype=torch.float32)[:, None].repeat(1, 3)}

    keys = ["aa" * 32, "bb" * 32, "aa" * 32, "cc" * 32]
    assert cache.fill(keys, compute, batch_size=2) == 3 and calls == [[0, 1], [3]]
    assert torch.equal(cache.load("cc" * 32)["x"], torch.full((3,), 3.0))
    assert cache.fill(keys, compute) == 0 and len(calls) == 2  # second run: every key hits


def test_processes_split_the_missing_entries_without_gaps_or_overlaps(tmp_path):
    keys = [f"{i:064x}" for i in range(0, 40 * 7919, 7919)]
    done = []

    def compute(positions):
        done.extend(positions)
        return {"x": torch.zeros(len(positions), 1)}

    cache = TensorCache(tmp_path)
    cache.fill(keys, compute, rank=1, world_size=2)  # rank 1 first: rank 0 then sees its writes
    cache.fill(keys, compute, rank=0, world_size=2)
    assert sorted(done) == list(range(len(keys))) and all(k in cache for k in keys)


def test_a_failed_write_leaves_no_entry(tmp_path, monkeypatch):
    cache = TensorCache(tmp_path)

    def broken(tensors, path):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(shards_module, "save_file", broken)
    with pytest.raises(OSError):
        cache.save("ab" * 32, {"x": torch.zeros(2)})
    assert "ab" * 32 not in cache


def test_fingerprints_follow_weights_and_config_but_not_the_scaling_factor():
    vae = tiny_vae()
    base = fingerprint(vae)
    assert fingerprint(tiny_vae()) == base
    vae.register_to_config(scaling_factor=0.5)
    assert fingerprint(vae) == base
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(vae) != base


def test_keys_change_with_anything_that_shapes_the_tensor():
    key = latent_key("d" * 64, 32, (0, 0, 32, 32), False, "v")
    others = [
        latent_key("e" * 64, 32, (0, 0, 32, 32), False, "v"),
        latent_key("d" * 64, 64, (0, 0, 32, 32), False, "v"),
        latent_key("d" * 64, 32, (4, 0, 36, 32), False, "v"),
        latent_key("d" * 64, 32, (0, 0, 32, 32), True, "v"),
        latent_key("d" * 64, 32, (0, 0, 32, 32), False, "w"),
    ]
    assert len({key, *others}) == 6
    ids = torch.tensor([49406, 320, 49407])
    assert text_key(ids, "t") == text_key(ids.clone(), "t") != text_key(ids, "u")
    assert text_key(ids, "t") != text_key(torch.tensor([49406, 321, 49407]), "t")


def test_latents_hit_on_a_second_run_and_are_recomputed_when_the_data_or_the_vae_change(tmp_path):
    data = write_folder(tmp_path / "data")
    cache, transform, vae = TensorCache(tmp_path / "cache"), ImageTransform(32), tiny_vae()
    files, computed = cache_latents(cache, load_rows(data), "image", transform, vae, flips=(False, True))
    assert computed == 8 and all(None not in pair for pair in files)
    assert cache_latents(cache, load_rows(data), "image", transform, vae, flips=(False, True))[1] == 0

    # the cached entries are the VAE's posterior for that image and flip
    pixels = torch.stack([transform((data / "2.png").read_bytes(), 2, flip=True)])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    entry = cache.load(files[2][1].key)
    torch.testing.assert_close(entry["mean"], posterior.mean[0])
    torch.testing.assert_close(entry["std"], posterior.std[0])

    # one image changes: only its two entries are computed again
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(data / "1.png")
    assert cache_latents(cache, load_rows(data), "image", transform, vae, flips=(False, True))[1] == 2
    # another VAE: everything is new; a new resolution likewise
    assert cache_latents(cache, load_rows(data), "image", transform, tiny_vae(seed=1))[1] == 4
    assert cache_latents(cache, load_rows(data), "image", ImageTransform(16), vae)[1] == 4
    # random crops: new entries where the crop differs from the centre one (the key holds the box)
    crop = ImageTransform(32, random_crop=True, seed=5)
    moved = sum(crop.crop_box((40, 32), i) != transform.crop_box((40, 32), i) for i in range(4))
    assert moved > 0 and cache_latents(cache, load_rows(data), "image", crop, vae)[1] == moved


def test_text_embeddings_hit_per_caption_and_follow_the_encoder(tmp_path):
    cache, encoder = TensorCache(tmp_path), tiny_text_encoder()
    ids = torch.tensor([[49406, 320, 49407], [49406, 321, 49407], [49406, 320, 49407]])
    files, computed = cache_text(cache, ids, encoder)
    assert computed == 2 and files[0] == files[2] != files[1]
    with torch.no_grad():
        expected = encoder(ids[1:2])[0][0]
    torch.testing.assert_close(cache.load(files[1].key)["embeds"], expected)
    assert cache_text(cache, ids, encoder)[1] == 0
    assert cache_text(cache, ids, tiny_text_encoder(seed=1))[1] == 2


def test_latents_from_cached_moments_equal_the_codecs_encode_with_the_same_draw():
    # One codec: a cached entry's mean and std, with the noise latent_dist.sample() would draw, give
    # the same x_0 as sdlite.latents.encode, shift included (the cache stores neither factor).
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.7, shift_factor=0.2)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = encode(vae, pixels, torch.Generator().manual_seed(3))
    moments = vae_moments(vae, pixels)
    noise = torch.randn(moments["mean"].shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sample_latents(moments, noise, vae.config), expected)
    assert not torch.allclose(sample_latents(moments, noise, {"scaling_factor": 0.7}), expected)
