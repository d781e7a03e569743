"""SDXL in training/train.py: the building blocks (training/family_sdxl.py), then a few steps of the tiny-sdxl
preset: every part trains, the size/crop numbers are each image's real ones, a run resumes exactly, and
the LoRA output loads in diffusers' StableDiffusionXLPipeline with the same images as ours."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file
from test_train import ROOT, assert_same_training, flags, launch, run_killed_at, weights

from pipelines import TextToImageXLPipeline
from sdlite.conditioning_xl import encode_prompts_xl
from sdlite.data.dataset import ImageTransform
from sdlite.models_xl import build_components_xl
from training import train as train_module
from training.cmd_evaluate import run_evaluation
from training.config import get, parse_config
from training.config.unet import TrainConfig
from training.families import family_of
from training.family_sdxl import SDXLDenoiser, StableDiffusionXL, crop_time_ids
from training.train import UNetTrainer, main


def images(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(["a red circle", "a blue square"], num_inference_steps=2, guidance_scale=4.0,
                generator=generator, output_type="np").images  # fmt: skip


def test_crop_time_ids_name_the_original_size_and_the_centre_crop():
    transform = ImageTransform(resolution=32)
    # a 64x32 (w, h) image resizes to 64x32, its centre crop starts 16 px from the left
    assert crop_time_ids(transform, (64, 32), 0) == (32, 64, 0, 16, 32, 32)
    assert crop_time_ids(ImageTransform(resolution=32), (40, 100), 0) == (100, 40, 24, 0, 32, 32)


def test_crop_time_ids_measure_a_flipped_crop_from_its_new_left_edge():
    transform = ImageTransform(resolution=32, random_crop=True, seed=3)
    left = transform.crop_box((96, 32), 5)[0]
    assert crop_time_ids(transform, (96, 32), 5, flip=True) == (32, 96, 0, 96 - (left + 32), 32, 32)


def test_denoiser_xl_passes_pooled_and_time_ids_to_the_unet():
    parts = build_components_xl("tiny-sdxl", seed=0)
    model = SDXLDenoiser(parts.unet).eval()
    cfg = parts.unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8)
    t = torch.tensor([10, 500])
    embeds = torch.randn(2, 77, cfg.cross_attention_dim)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(2, pooled_dim)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        a = model(x, t, (embeds, pooled, ids))
        b = model(x, t, (embeds, pooled, ids * 2))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)  # the size/crop numbers reach the U-Net


# ---- training/train.py on the tiny-sdxl preset ---------------------------------------------------------


def run(data, cache, out, **options):
    """training/train.py's main on tiny-sdxl; accelerate's one state per process reset around it (the
    runs here differ in precision)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return main(flags(data, cache, out, preset="tiny-sdxl", **options))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def losses_of(monkeypatch) -> list[float]:
    """The loss of every optimizer step of the runs that follow."""
    losses, step = [], UNetTrainer.optimizer_step

    def record(trainer, i):
        logs, nonfinite = step(trainer, i)
        losses.append(logs["loss"].item())
        return logs, nonfinite

    monkeypatch.setattr(UNetTrainer, "optimizer_step", record)
    return losses


def test_a_few_steps_train_unet_and_both_encoders_and_save_a_folder_diffusers_loads(
    data, cache, tmp_path, monkeypatch
):
    losses = losses_of(monkeypatch)
    final = run(data, cache, tmp_path, train_text_encoder="true", mixed_precision="bf16", train_batch_size=2,
                gradient_accumulation_steps=2, caption_dropout=0.5, val_data_dir=data / "test",
                validation_prompts="a red circle", validation_inference_steps=2)  # fmt: skip
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    initial = build_components_xl("tiny-sdxl", seed=0)
    for part in ("unet_raw", "text_encoder_raw", "text_encoder_2_raw"):
        before, after = getattr(initial, part.removesuffix("_raw")).state_dict(), weights(final, part)
        assert any(not torch.equal(before[k], after[k]) for k in after), f"{part} did not change"
    assert (tmp_path / "validation" / "step-3.png").is_file()
    pipes = (
        TextToImageXLPipeline.from_pretrained(final),
        StableDiffusionXLPipeline.from_pretrained(final, local_files_only=True, add_watermarker=False),
    )
    # trained from nothing with dropped captions as the empty prompt's embeddings: guidance's other half
    assert [pipe.config.force_zeros_for_empty_prompt for pipe in pipes] == [False, False]
    ours, theirs = (images(pipe) for pipe in pipes)
    assert ours.shape == (2, 32, 32, 3) and np.abs(ours - theirs).max() <= 1e-4
    # sdlite evaluate reads the folder: prompt fidelity, and bits/dim with pooled embeddings and time ids
    results = run_evaluation(str(final), n=2, steps=2, colours=["red"], shapes=["circle", "square"],
                             bpd_count=4, stride=250)  # fmt: skip
    assert set(results["per_prompt"]) == {"a red circle", "a red square"}
    assert math.isfinite(results["bpd"]) and results["bound"]["count"] == 4


def bucket_photos(folder: Path) -> Path:
    """A caption folder: a 200x40 image (bucket 128x32 at resolution 64: resized to 160x32, a random 128
    wide crop), a 64x64 one and a 40x200 one."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide": (200, 40), "square": (64, 64), "tall": (40, 200)}.items():
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a {name} picture")
    return folder


def test_time_ids_of_a_bucketed_cropped_flipped_image_are_its_real_size_and_crop(
    cache, tmp_path, monkeypatch
):
    photos = bucket_photos(tmp_path / "photos")
    built, real = [], train_module.training_data
    monkeypatch.setattr(train_module, "training_data", lambda *a: built.append(real(*a)) or built[-1])
    seen, condition = [], StableDiffusionXL.condition
    monkeypatch.setattr(
        StableDiffusionXL, "condition", lambda f, b, *a: seen.append(b) or condition(f, b, *a)
    )
    options = dict(aspect_buckets="true", resolution=64, random_crop="true", random_flip="true")
    run(
        photos,
        cache,
        tmp_path / "run",
        train_data_dir=photos,
        train_batch_size=1,
        max_steps=4,
        seed=1,
        **options,
    )
    examples = built[0].examples
    wide = next(r for r, p in enumerate(examples.examples.images["image"]) if "wide" in p["path"])
    plain, flipped = (examples[(wide, flip)] for flip in (False, True))
    left = int(plain["time_ids"][3])
    assert 0 < left < 32  # a random crop of the 160 px wide resize to 128
    assert plain["time_ids"].tolist() == [40, 200, 0, left, 32, 128]  # original (h, w), top, left, target
    # flipped, the crop starts where the unflipped one ended, counted from the (new) left edge
    assert flipped["time_ids"].tolist() == [40, 200, 0, 160 - (left + 128), 32, 128]
    assert plain["mean"].shape == (4, 32 // 4, 128 // 4)  # the latents are the target size's
    square = next(r for r, p in enumerate(examples.examples.images["image"]) if "square" in p["path"])
    assert examples[(square, True)]["time_ids"].tolist() == [64, 64, 0, 0, 64, 64]
    # the steps' batches carry them: each batch's time ids are one of its items' two
    assert len(seen) == 4 and all(b["time_ids"].shape == (1, 6) for b in seen)
    known = {tuple(examples[(r, f)]["time_ids"].tolist()) for r in range(3) for f in (False, True)}
    assert all(tuple(b["time_ids"][0].tolist()) in known for b in seen)


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_same_weights(
    data, cache, tmp_path, monkeypatch
):
    options = dict(max_steps=4, checkpoint_every=2, train_text_encoder="true", random_flip="true",
                   caption_dropout=0.25, lr_scheduler="cosine", lr_warmup_steps=1)  # fmt: skip
    run(data, cache, tmp_path / "whole", **options)
    run_killed_at(monkeypatch, 2, lambda: run(data, cache, tmp_path / "broken", **options))
    assert (tmp_path / "broken" / "checkpoint-2" / "text_encoder_2.safetensors").is_file()
    run(data, cache, tmp_path / "broken", resume="latest", **options)
    for part in ("unet_raw", "unet", "text_encoder_2_raw", "text_encoder_2"):
        a, b = (weights(tmp_path / name / "final", part) for name in ("whole", "broken"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_a_lora_on_unet_and_both_encoders_gives_the_same_images_in_diffusers(data, cache, tmp_path):
    final = run(data, cache, tmp_path, lora="true", lora_rank=4, lora_alpha=8, lora_text_encoder="true",
                learning_rate=1e-2, text_encoder_lr=1e-3, lora_from_scratch="true")  # fmt: skip
    state = load_file(final / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in state} == {"unet", "text_encoder", "text_encoder_2"}
    # every B moved from zero but those of encoder 1's last layer, whose output SDXL never reads (it
    # takes the penultimate states; encoder 2's last layer feeds the pooled embedding)
    still = {k for k, v in state.items() if "lora_B" in k and not v.abs().max() > 0}
    assert still == {f"text_encoder.encoder.layers.1.self_attn.{p}.lora_B.weight"
                     for p in ("q_proj", "k_proj", "v_proj", "out_proj")}  # fmt: skip
    ours = TextToImageXLPipeline(**build_components_xl("tiny-sdxl", seed=0).as_dict())  # the run's base
    theirs = StableDiffusionXLPipeline(**build_components_xl("tiny-sdxl", seed=0).as_dict(),
                                       add_watermarker=False)  # fmt: skip
    before = images(ours)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(final)
    after = images(ours)
    assert np.abs(after - before).max() > 1e-3  # the adapter changes the images
    assert np.abs(after - images(theirs)).max() <= 1e-4


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(streaming="true"), "streaming with SDXL"),
        (dict(caption_tag_dropout_rate=0.1), "caption_tag_dropout_rate with SDXL"),
        (dict(text_encoder_layers=0), "text_encoder_layers is for SD presets"),
        (dict(unet_block_out_channels="32,64,64"), "unet_block_out_channels is for SD presets"),
        (dict(unet_mid_block="false"), "unet_mid_block is for SD presets"),
        (dict(unet_layers_per_block="1,1,1"), "unet_layers_per_block is for SD presets"),
    ],
)
def test_settings_sdxl_cannot_take_yet_fail_before_training(data, tmp_path, setting, words):
    with pytest.raises(ValueError, match=words):
        run(data, tmp_path / "cache", tmp_path, **setting)
    assert not (tmp_path / "cache").exists()  # nothing was encoded


def test_two_launched_processes_train_like_one_with_the_same_global_batch(data, cache, tmp_path):
    run(data, cache, tmp_path / "one", train_text_encoder="true")
    args = flags(
        data, cache, tmp_path / "two", preset="tiny-sdxl", train_text_encoder="true", train_batch_size=2
    )
    log = launch(["--multi_gpu", "--num_processes", "2"], args)
    assert "global batch 4" in log  # 2 processes x 2
    for part in ("unet_raw", "text_encoder_2_raw", "unet"):
        assert_same_training(tmp_path / "one", tmp_path / "two", part)


def test_the_tiny_sdxl_recipe_sets_valid_settings_of_an_sdxl_run():
    path = ROOT / "configs" / "tiny-sdxl-shapes.yaml"
    cfg = parse_config(TrainConfig, ["--config", str(path)])
    written = yaml.safe_load(path.read_text())
    assert {key: get(cfg, key) for key in written} == written  # every key read, with its value
    cfg.check()
    assert family_of(cfg.model) is StableDiffusionXL and not StableDiffusionXL.refusals(cfg)


def test_a_dropped_caption_is_the_empty_prompt_encoded_by_both_encoders():
    parts = build_components_xl("tiny-sdxl", seed=0)
    family = StableDiffusionXL(parts)
    empty = family.empty_condition(cached=True, device=torch.device("cpu"))
    with torch.no_grad():
        expected = encode_prompts_xl(parts.text_encoder, parts.text_encoder_2, parts.tokenizer,
                                     parts.tokenizer_2, [""])  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(empty, expected))
    batch = {"embeds": torch.randn(2, *empty[0].shape[1:]), "pooled": torch.randn(2, empty[1].shape[1]),
             "time_ids": torch.tensor([[40.0, 200, 0, 11, 32, 128]] * 2)}  # fmt: skip
    drop = torch.tensor([True, False])
    embeds, pooled, time_ids = family.condition(batch, empty, drop, trains=False)
    assert torch.equal(embeds[0], empty[0][0]) and torch.equal(pooled[0], empty[1][0])  # dropped
    assert torch.equal(embeds[1], batch["embeds"][1]) and torch.equal(pooled[1], batch["pooled"][1])  # kept
    assert torch.equal(time_ids, batch["time_ids"])  # a dropped caption keeps its image's size and crop


def test_fine_tuning_an_sdxl_folder_with_a_separately_trained_vae_keeps_its_scale_and_settings(
    data, cache, tmp_path
):
    folder = build_components_xl("tiny-sdxl", seed=2).save_pretrained(tmp_path / "base")  # zeros: SDXL base's
    vae = build_components_xl("tiny-sdxl", seed=3).vae
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "my-vae" / "vae")
    final = run(data, cache, tmp_path / "run", pretrained=folder, vae_path=tmp_path / "my-vae", max_steps=1,
                checkpoint_every=0, ema_decay="none")  # fmt: skip
    pipe = StableDiffusionXLPipeline.from_pretrained(final, local_files_only=True, add_watermarker=False)
    assert pipe.vae.config.scaling_factor == 0.5 and pipe.config.force_zeros_for_empty_prompt is True
    before, after = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors"), weights(final, "unet")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # one step from the folder's weights


def test_the_family_registry_picks_sdxl_for_its_presets_and_folders_and_sd_for_the_rest(tmp_path):
    from sdlite.models import build_components
    from training.config.unet import ModelSection
    from training.family import StableDiffusion

    build_components_xl("tiny-sdxl", seed=0).save_pretrained(tmp_path / "xl")
    build_components("tiny", seed=0).save_pretrained(tmp_path / "sd")
    assert family_of(ModelSection(preset="tiny-sdxl")) is StableDiffusionXL
    assert family_of(ModelSection(pretrained=str(tmp_path / "xl"))) is StableDiffusionXL
    assert family_of(ModelSection(preset="tiny")) is StableDiffusion
    assert family_of(ModelSection(pretrained=str(tmp_path / "sd"))) is StableDiffusion
