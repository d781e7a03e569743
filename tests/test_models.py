"""Presets build the architectures they name; model folders round-trip through diffusers' layout."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from sdlite.ddpm import DDPMScheduler
from sdlite.models import ModelFolderError, build_components, check_folder, load_components, save_components
from sdlite.presets import PRESETS, get_preset


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_sd15_preset_has_stable_diffusion_1_5_parameter_counts():
    p = get_preset("sd15")
    with torch.device("meta"):  # the shapes only: no 4 GB of random weights
        vae = AutoencoderKL(**p.config("vae"))
        unet = UNet2DConditionModel(**p.config("unet"))
        te = CLIPTextModel(CLIPTextConfig(**p.config("text_encoder")))
    # The published sizes of SD 1.5's VAE, U-Net and CLIP ViT-L/14 text encoder.
    assert (_n_params(vae), _n_params(unet), _n_params(te)) == (83_653_863, 859_520_964, 123_060_480)
    assert p.vae_factor == 8 and p.latent_size == 64 and p.max_length == 77


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_scheduler_never_clips_latents(name):
    assert PRESETS[name].scheduler["clip_sample"] is False


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_scheduler_has_the_steps_offset_diffusers_keeps(name):
    # diffusers' StableDiffusionPipeline rewrites any other value (and then samples other timesteps).
    assert DDPMScheduler(**PRESETS[name].scheduler).config.steps_offset == 1


def test_save_components_records_optional_parts_as_null_and_a_variant(tmp_path):
    parts = build_components("tiny", seed=0).as_dict() | {"safety_checker": None, "image_encoder": None}
    save_components(parts, tmp_path, variant="fp16")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"] == index["image_encoder"] == [None, None]
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]  # sdlite's DDPM, by the class it mirrors
    assert (tmp_path / "vae" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, variant="fp16", local_files_only=True)
    assert loaded.safety_checker is None and loaded.scheduler.config.steps_offset == 1


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="sd15"):
        get_preset("sd99")


def test_tiny_parts_fit_together():
    parts = build_components("tiny", seed=0)
    p = get_preset("tiny")
    images = torch.rand(2, 3, p.resolution, p.resolution) * 2 - 1
    latents = parts.vae.encode(images).latent_dist.mean
    assert latents.shape == (2, 4, p.latent_size, p.latent_size)
    ids = parts.tokenizer(
        ["a red circle", "a blue square"], padding="max_length", max_length=p.max_length, return_tensors="pt"
    ).input_ids
    embeds = parts.text_encoder(ids)[0]
    assert embeds.shape == (2, p.max_length, p.unet["cross_attention_dim"])
    eps = parts.unet(latents, torch.tensor([10, 500]), embeds).sample
    assert eps.shape == latents.shape
    assert parts.vae.decode(latents).sample.shape == images.shape


def test_same_seed_same_weights():
    a, b = build_components("tiny", seed=3), build_components("tiny", seed=3)
    for x, y in zip(a.unet.state_dict().values(), b.unet.state_dict().values()):
        assert torch.equal(x, y)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    parts = build_components("tiny", seed=0)
    parts.save_pretrained(path)
    return parts, path


def test_saved_folder_loads_back_identical(saved):
    parts, path = saved
    loaded = load_components(path)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    for name in ("vae", "unet", "text_encoder"):
        ref, got = getattr(parts, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys()
        assert all(torch.equal(ref[k], got[k]) for k in ref), name
    assert loaded.tokenizer.model_max_length == get_preset("tiny").max_length
    assert loaded.scheduler.config.beta_schedule == parts.scheduler.config.beta_schedule


def test_saved_folder_is_safetensors_and_loads_in_diffusers(saved):
    _, path = saved
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (path / "text_encoder" / "model.safetensors").is_file()
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == 64


def test_folder_saved_by_diffusers_loads(saved, tmp_path):
    _, path = saved
    StableDiffusionPipeline.from_pretrained(path, local_files_only=True).save_pretrained(tmp_path)
    loaded = load_components(tmp_path)
    assert loaded.unet.config.in_channels == 4


def test_missing_part_is_named(saved, tmp_path):
    _, path = saved
    with pytest.raises(ModelFolderError, match="no unet"):
        check_folder(_copy_without(path, tmp_path, "unet"))
    with pytest.raises(ModelFolderError, match="does not exist"):
        load_components(tmp_path / "nowhere")


def test_mismatched_parts_are_named(saved, tmp_path):
    _, path = saved
    folder = _copy_without(path, tmp_path, "text_encoder")
    wide = get_preset("tiny").config("text_encoder") | {"hidden_size": 32, "intermediate_size": 64}
    CLIPTextModel(CLIPTextConfig(**wide)).save_pretrained(folder / "text_encoder")
    with pytest.raises(ModelFolderError, match="cross_attention_dim is 64 .* width is 32"):
        load_components(folder)


def _copy_without(src, dst, part):
    import shutil

    out = dst / "copy"
    shutil.copytree(src, out)
    shutil.rmtree(out / part)
    return out


def test_model_index_records_the_scheduler_class_the_folder_holds(tmp_path):
    from diffusers import EulerDiscreteScheduler

    parts = build_components("tiny")
    parts.save_pretrained(tmp_path / "ddpm")
    assert json.loads((tmp_path / "ddpm" / "model_index.json").read_text())["scheduler"] == [
        "diffusers",
        "DDPMScheduler",
    ]
    parts.scheduler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    parts.save_pretrained(tmp_path / "euler")
    index = json.loads((tmp_path / "euler" / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "euler", local_files_only=True)
    assert isinstance(loaded.scheduler, EulerDiscreteScheduler)
