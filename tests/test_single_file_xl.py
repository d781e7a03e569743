"""SDXL (SGM layout) and SD 2.x (OpenCLIP) single-file checkpoints: ours, diffusers' reader, and bad files."""

from dataclasses import replace

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    infer_diffusers_model_type,
)
from safetensors.torch import load_file, save_file

from pipelines import TextToImagePipeline
from pipelines.single_file import save_single_file, to_original_layout
from pipelines.single_file_xl import (
    SD2_OPENCLIP_KEY,
    detect_layout,
    hf_from_openclip,
    load_single_file_sd2,
    load_single_file_xl,
    openclip_from_hf,
    save_single_file_xl,
    to_original_layout_xl,
)
from sdlite.models import ModelFolderError, build_components
from sdlite.models_xl import build_components_xl
from sdlite.presets import DDPM_LINEAR, _clip_text, _unet, get_preset

XL_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def parts():
    return build_components_xl("tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    return parts.save_pretrained(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def checkpoint(parts, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "tiny-sdxl.safetensors"
    return save_single_file_xl(parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2, path)


def assert_same_weights(a, b, names):
    for name in names:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def test_our_sdxl_single_file_loads_in_diffusers_own_loader_with_equal_weights(parts, folder, checkpoint):
    theirs = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(folder), local_files_only=True
    )
    assert_same_weights(parts, theirs, XL_MODELS)


def test_sdxl_single_file_round_trips_through_our_loader(parts, folder, checkpoint):
    prefixes = {".".join(k.split(".")[:3]) for k in load_file(checkpoint) if k.startswith("conditioner.")}
    assert prefixes == {"conditioner.embedders.0", "conditioner.embedders.1"}
    for config in ("tiny-sdxl", folder):  # a preset name, or a folder with the configs and tokenizers
        loaded = load_single_file_xl(checkpoint, config=config)
        assert_same_weights(parts, loaded, XL_MODELS)
        assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.model_max_length == 16


def test_the_buffers_published_sdxl_files_also_hold_are_ignored(parts, checkpoint, tmp_path):
    state = load_file(checkpoint)
    state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    state["conditioner.embedders.1.model.logit_scale"] = torch.tensor(4.6052)  # OpenCLIP's, unused here
    save_file(state, tmp_path / "published.safetensors")
    assert_same_weights(
        parts, load_single_file_xl(tmp_path / "published.safetensors", "tiny-sdxl"), XL_MODELS
    )


def test_sdxl_single_file_saved_in_half_precision_loads_in_the_dtype_asked(parts, tmp_path):
    path = save_single_file_xl(
        parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2, tmp_path / "half.safetensors",
        dtype=torch.float16,
    )  # fmt: skip
    assert load_file(path)["conditioner.embedders.1.model.text_projection"].dtype == torch.float16
    loaded = load_single_file_xl(path, config="tiny-sdxl", torch_dtype=torch.bfloat16)
    assert {getattr(loaded, name).dtype for name in XL_MODELS} == {torch.bfloat16}


def test_sdxl_keys_are_sdxl_1_0_bases_and_diffusers_recognises_them():
    p = build_components_xl("sdxl", seed=None, device="meta")  # names and shapes only
    unet, vae = p.unet, p.vae
    ckpt = to_original_layout_xl(
        unet.state_dict(), vae.state_dict(), p.text_encoder.state_dict(), p.text_encoder_2.state_dict(),
        unet.config, vae.config,
    )  # fmt: skip
    # Names and shapes as in the published sd_xl_base_1.0.safetensors.
    shapes = {
        "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640),
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "model.diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        "conditioner.embedders.1.model.text_projection": (1280, 1280),
    }
    assert {k: tuple(ckpt[k].shape) for k in shapes} == shapes
    assert infer_diffusers_model_type(ckpt) == "xl_base" and detect_layout(ckpt) == "SDXL"
    assert convert_ldm_unet_checkpoint(ckpt, dict(unet.config)).keys() == unet.state_dict().keys()
    assert convert_ldm_vae_checkpoint(ckpt, dict(vae.config)).keys() == vae.state_dict().keys()


def test_openclip_mapping_is_its_own_inverse_and_agrees_with_diffusers(parts):
    encoder = parts.text_encoder_2
    ours = openclip_from_hf(encoder.state_dict())
    assert ours["text_projection"].shape == (64, 32)  # OpenCLIP's (width, projection): x @ P
    back = hf_from_openclip(ours, encoder)
    state = encoder.state_dict()
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    theirs = convert_open_clip_checkpoint(encoder, {"p." + k: v for k, v in ours.items()}, prefix="p.")
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[k], state[k]) for k in state)


def test_a_file_of_unknown_layout_names_the_keys_found_and_the_layouts_expected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(1), "lora_unet_up.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError) as e:
        load_single_file_xl(path)
    message = str(e.value)
    assert "its keys start with lora_unet_down.* (1 key), lora_unet_up.* (1 key)." in message
    assert (
        "SDXL: model.diffusion_model.*, first_stage_model.*, conditioner.embedders.0.transformer.*" in message
    )
    assert "SD 2.x: model.diffusion_model.*, first_stage_model.*, cond_stage_model.model.*" in message
    assert "It looks like a LoRA" in message


def test_a_refiner_is_named_and_many_prefixes_are_summed_up(tmp_path):
    path = tmp_path / "refiner.safetensors"
    keys = ["conditioner.embedders.0.model.positional_embedding"] + [f"x{i}.weight" for i in range(10)]
    save_file({k: torch.zeros(1) for k in keys}, path)
    with pytest.raises(
        ValueError, match=r"conditioner.embedders.0.model.\* \(1 key\), .* and 3 other prefixes.*refiner"
    ):
        load_single_file_xl(path)


def test_a_unet_only_file_names_the_missing_prefixes(parts, tmp_path):
    path = tmp_path / "unet.safetensors"
    state = {"model.diffusion_model." + k: v.contiguous() for k, v in parts.unet.state_dict().items()}
    save_file(state, path)
    with pytest.raises(
        ValueError, match=r"its keys start with model.diffusion_model.\* \(\d+ keys\)\. Expected"
    ):
        load_single_file_xl(path)


def test_an_sd1_file_is_sent_to_the_sd1_loader(tmp_path):
    sd1 = build_components("tiny", seed=0)
    path = save_single_file(sd1.unet, sd1.vae, sd1.text_encoder, tmp_path / "sd1.safetensors")
    with pytest.raises(
        ValueError, match="is an SD 1.x single-file checkpoint, not SDXL: load it with load_single_file"
    ):
        load_single_file_xl(path)


def test_sdxl_single_file_refuses_pickles_and_names_a_config_that_does_not_fit(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="must be a .safetensors file"):
        load_single_file_xl(tmp_path / "model.ckpt")
    with pytest.raises(ModelFolderError, match="do not fit the architecture of config='sdxl'"):
        load_single_file_xl(checkpoint)  # the default architecture is SDXL 1.0's
    with pytest.raises(ValueError, match=r"config must be an SDXL preset name \['sdxl', 'tiny-sdxl'\]"):
        load_single_file_xl(checkpoint, config="tiny")


# ---- SD 2.x: the OpenCLIP text encoder under cond_stage_model.model., penultimate layer -------------

TINY_SD2 = replace(
    get_preset("tiny"),
    name="tiny-sd2",
    unet=_unet([32, 64, 128], 1, 8, 64, head_dim=[2, 4, 8], groups=16) | {"use_linear_projection": True},
    text_encoder=_clip_text(64, layers=2, heads=4, max_length=16, act="gelu", projection_dim=32),
    scheduler=DDPM_LINEAR | {"prediction_type": "v_prediction"},
)


def _sd2_file(parts, path, extra_layer: bool):
    """An SD 2.x checkpoint as Stability writes one: OpenCLIP's whole text tower (with the layer past
    the penultimate when ``extra_layer``, text_projection and logit_scale), U-Net and VAE."""
    unet, vae = parts.unet, parts.vae
    ckpt = to_original_layout(unet.state_dict(), vae.state_dict(), {}, unet.config, vae.config)
    tower = openclip_from_hf(parts.text_encoder.state_dict())
    if extra_layer:
        tower.update(
            {
                k.replace("resblocks.1.", "resblocks.2."): v + 1
                for k, v in tower.items()
                if "resblocks.1." in k
            }
        )
        tower.update(text_projection=torch.randn(64, 32), logit_scale=torch.tensor(4.6052))
    ckpt.update({SD2_OPENCLIP_KEY + k: v for k, v in tower.items()})
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path)
    return path


def test_sd2_single_file_loads_leaving_out_the_layer_past_the_penultimate(tmp_path):
    parts = build_components(TINY_SD2, seed=0)
    path = _sd2_file(parts, tmp_path / "sd2.safetensors", extra_layer=True)
    assert detect_layout(load_file(path)) == "SD 2.x"
    loaded = load_single_file_sd2(path, config=TINY_SD2)
    assert_same_weights(parts, loaded, ("unet", "vae", "text_encoder"))
    assert loaded.scheduler.config.prediction_type == "v_prediction"  # from the config: the file cannot say
    with pytest.raises(
        ValueError, match="is an SD 2.x single-file checkpoint, not SDXL: load it with load_single_file_sd2"
    ):
        load_single_file_xl(path)


def test_sd2_single_file_loads_as_in_diffusers_own_loader(tmp_path):
    parts = build_components(TINY_SD2, seed=0)
    folder = parts.save_pretrained(tmp_path / "folder")
    path = _sd2_file(parts, tmp_path / "sd2.safetensors", extra_layer=False)
    theirs = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )
    ours = load_single_file_sd2(path, config=folder)
    assert_same_weights(theirs, ours, ("unet", "vae", "text_encoder"))
    assert_same_weights(parts, ours, ("unet", "vae", "text_encoder"))


def test_the_sd_pipeline_reads_sd2_files_and_sends_sdxl_files_to_the_xl_pipeline(checkpoint, tmp_path):
    parts = build_components(TINY_SD2, seed=0)
    folder = parts.save_pretrained(tmp_path / "folder")
    path = _sd2_file(parts, tmp_path / "sd2.safetensors", extra_layer=True)
    pipe = TextToImagePipeline.from_single_file(path, config=folder)
    assert_same_weights(parts, pipe, ("unet", "vae", "text_encoder"))
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    with pytest.raises(ValueError, match="is an SDXL checkpoint: load it with TextToImageXLPipeline"):
        TextToImagePipeline.from_single_file(checkpoint)
