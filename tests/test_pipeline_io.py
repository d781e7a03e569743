"""TextToImagePipeline loads and saves diffusers folders and original-layout single-file checkpoints."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines import TextToImagePipeline
from pipelines.single_file import save_single_file, to_original_layout
from sdlite.ddpm import DDPMScheduler
from sdlite.models import ModelFolderError, build_components
from sdlite.presets import get_preset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_components("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder):
    return TextToImagePipeline.from_pretrained(folder)


def images(pipe, **kw):
    kw = dict(num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np") | kw
    return pipe(["a red circle", "a blue square"], progress=False, **kw).images


@pytest.fixture(scope="module")
def reference(pipe):
    return images(pipe)


def test_folder_loads_with_our_ddpm_scheduler(pipe):
    assert isinstance(pipe.scheduler, DDPMScheduler)
    assert pipe.scheduler.config.clip_sample is False


def test_save_and_reload_gives_identical_images(pipe, reference, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"] == ["diffusers", "DDPMScheduler"]
    assert np.array_equal(images(TextToImagePipeline.from_pretrained(tmp_path)), reference)
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert theirs.unet.config.cross_attention_dim == 64


def test_folder_saved_by_diffusers_loads_with_our_scheduler(folder, reference, tmp_path):
    StableDiffusionPipeline.from_pretrained(folder, local_files_only=True).save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, DDPMScheduler)
    assert np.array_equal(images(loaded), reference)


def test_saved_folder_loads_in_diffusers_unchanged_with_the_same_images(pipe, folder, reference):
    """The presets' scheduler config is one diffusers' StableDiffusionPipeline keeps as it is (no
    steps_offset / clip_sample rewrite, no warning), so both pipelines draw the same images: with the
    folder's DDPM scheduler, and with any diffusers scheduler made from_config on both sides."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert config["steps_offset"] == 1 and config["clip_sample"] is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert not [w for w in caught if "steps_offset" in str(w.message) or "clip_sample" in str(w.message)]
    assert dict(theirs.scheduler.config) == dict(DiffusersDDPM.from_config(config).config)
    theirs.set_progress_bar_config(disable=True)
    assert np.abs(images(theirs) - reference).max() <= 1e-4
    ours = TextToImagePipeline.from_pretrained(folder)
    for cls in (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler):
        ours.scheduler = cls.from_config(ours.scheduler.config)
        theirs.scheduler = cls.from_config(theirs.scheduler.config)
        a, b = (images(p, num_inference_steps=8) for p in (ours, theirs))  # PNDM needs more than 3
        assert np.abs(a - b).max() <= 1e-4, cls.__name__


def test_scheduler_config_with_absurd_train_timesteps_is_refused_before_any_table(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "m")
    config_file = tmp_path / "m" / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"num_train_timesteps": 10**8}))
    with pytest.raises(ValueError, match="num_train_timesteps must be an int in"):
        TextToImagePipeline.from_pretrained(tmp_path / "m")


def test_other_scheduler_classes_save_and_load_as_theirs(folder, tmp_path):
    pipe = TextToImagePipeline.from_pretrained(folder)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["scheduler"][1] == "EulerDiscreteScheduler"
    assert isinstance(TextToImagePipeline.from_pretrained(tmp_path).scheduler, EulerDiscreteScheduler)
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    assert isinstance(theirs.scheduler, EulerDiscreteScheduler)


def test_folder_without_tokenizer_gets_clips_built_offline(folder, reference, tmp_path):
    shutil.copytree(folder, tmp_path / "m")
    shutil.rmtree(tmp_path / "m" / "tokenizer")
    loaded = TextToImagePipeline.from_pretrained(tmp_path / "m")
    assert loaded.tokenizer.model_max_length == 16
    assert np.array_equal(images(loaded), reference)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        TextToImagePipeline.from_pretrained(tmp_path / "nowhere")


def test_torch_dtype_loads_and_generates_in_bfloat16(folder):
    pipe = TextToImagePipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16
    out = images(pipe, output_type="pt")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert pipe.to(torch.float32).unet.dtype == torch.float32


def test_single_file_round_trip_gives_identical_images(pipe, folder, reference, tmp_path):
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    keys = load_file(path).keys()
    assert all(k.split(".")[0] in ("model", "first_stage_model", "cond_stage_model") for k in keys)
    for config in ("tiny", folder):  # a preset name, or a folder with the configs
        loaded = TextToImagePipeline.from_single_file(path, config=config)
        assert isinstance(loaded.scheduler, DDPMScheduler)
        assert np.array_equal(images(loaded), reference)


def test_single_file_loads_in_diffusers_own_single_file_loader(pipe, folder, tmp_path):
    path = pipe.save_single_file(tmp_path / "model.safetensors")
    theirs = StableDiffusionPipeline.from_single_file(
        path, config=str(folder), local_files_only=True, safety_checker=None
    )
    for name in ("unet", "vae", "text_encoder"):
        ours, got = getattr(pipe, name).state_dict(), getattr(theirs, name).state_dict()
        assert ours.keys() == got.keys()
        assert all(torch.equal(ours[k], got[k]) for k in ours), name


def test_single_file_in_half_precision_loads_as_asked(pipe, tmp_path):
    path = pipe.save_single_file(tmp_path / "model.safetensors", dtype=torch.float16)
    assert load_file(path)["model.diffusion_model.out.2.weight"].dtype == torch.float16
    loaded = TextToImagePipeline.from_single_file(path, config="tiny", torch_dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16
    assert TextToImagePipeline.from_single_file(path, config="tiny").unet.dtype == torch.float32


def test_single_file_keys_are_stable_diffusion_15s_and_diffusers_reads_them():
    p = get_preset("sd15")
    with torch.device("meta"):  # the key names and shapes only
        unet = UNet2DConditionModel(**p.config("unet"))
        vae = AutoencoderKL(**p.config("vae"))
        text = CLIPTextModel(CLIPTextConfig(**p.config("text_encoder")))
    ckpt = to_original_layout(unet.state_dict(), vae.state_dict(), text.state_dict(), unet.config, vae.config)
    # Names and shapes as in the published v1-5-pruned checkpoint.
    shapes = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (640, 960, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    assert {k: tuple(ckpt[k].shape) for k in shapes} == shapes
    n_unet, n_vae = len(unet.state_dict()), len(vae.state_dict())
    assert (n_unet, n_vae) == (686, 248)
    assert len(ckpt) == n_unet + n_vae + len(text.state_dict())
    # diffusers' own reader maps every key back to the model's.
    assert convert_ldm_unet_checkpoint(ckpt, p.config("unet")).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(ckpt, p.config("vae")).keys() == vae.state_dict().keys()
    text_keys = {k.removeprefix("text_model.") for k in convert_ldm_clip_checkpoint(ckpt)}
    assert text_keys == {k.removeprefix("text_model.") for k in text.state_dict()}


@pytest.mark.parametrize(
    "unet_shape, vae_shape, error",
    [
        (dict(layers_per_block=[0, 1, 0]), {}, "this U-Net .* has no original-layout names"),
        (dict(mid_block_type=None), {}, "this U-Net .* has no original-layout names"),
        ({}, dict(mid_block_add_attention=False), "this VAE has no attention in its middle blocks"),
    ],
)
def test_single_file_refuses_a_model_its_layout_has_no_names_for(unet_shape, vae_shape, error, tmp_path):
    p = get_preset("tiny")
    unet = UNet2DConditionModel(**{**p.config("unet"), "block_out_channels": [32, 64, 64], **unet_shape})
    vae = AutoencoderKL(**{**p.config("vae"), **vae_shape})
    text = CLIPTextModel(CLIPTextConfig(**p.config("text_encoder")))
    with pytest.raises(ValueError, match=f"{error}.*save it as a diffusers folder"):
        save_single_file(unet, vae, text, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


def test_single_file_refuses_pickles_and_names_mismatched_configs(pipe, tmp_path):
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        TextToImagePipeline.from_single_file(tmp_path / "model.ckpt")
    path = pipe.save_single_file(tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="do not fit the architecture of config='sd15'"):
        TextToImagePipeline.from_single_file(path)  # the default architecture is SD 1.5's
    with pytest.raises(ValueError, match=r"config must be a preset name \['sd15', 'small', 'tiny'\]"):
        TextToImagePipeline.from_single_file(path, config="sd99")
