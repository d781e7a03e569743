"""SDXL model folders: diffusers' layout both ways, and clear errors for folders that are not one SDXL."""

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from sdlite.conditioning_xl import add_time_ids, encode_prompts_xl
from sdlite.models import ModelFolderError, build_components
from sdlite.models_xl import (
    build_components_xl,
    check_folder_xl,
    is_refiner_folder,
    is_xl_folder,
    load_components_xl,
)
from sdlite.tokenizer import token_ids

MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def parts():
    return build_components_xl("tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def folder(parts, tmp_path_factory):
    return parts.save_pretrained(tmp_path_factory.mktemp("tiny-sdxl"))


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return build_components("tiny", seed=0).save_pretrained(tmp_path_factory.mktemp("tiny-sd1"))


def assert_same_weights(a, b):
    for name in MODELS:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), name
        assert all(torch.equal(x[k], y[k]) for k in x), name


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def test_saved_folder_loads_in_diffusers_sdxl_pipeline_and_back_in_sdlite(parts, folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    theirs = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    assert_same_weights(parts, theirs)
    ours = load_components_xl(folder)
    assert_same_weights(parts, ours)
    assert is_xl_folder(folder)
    # Encoder 2 reads OpenCLIP's padding ("!", id 0) after the prompt; encoder 1 CLIP's (EOS).
    assert token_ids(ours.tokenizer_2, ["a cat"])[0, -1] == 0 == theirs.tokenizer_2.pad_token_id
    assert token_ids(ours.tokenizer, ["a cat"])[0, -1] == 49407


def test_loads_in_the_dtype_asked(folder):
    ours = load_components_xl(folder, torch_dtype=torch.bfloat16)
    assert {getattr(ours, name).dtype for name in MODELS} == {torch.bfloat16}


def test_text_encoders_get_gradients_through_the_conditioning(parts):
    embeds, pooled = encode_prompts_xl(
        parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2, ["a red circle"]
    )
    (embeds.square().mean() + pooled.square().mean()).backward()
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        assert encoder.get_input_embeddings().weight.grad.abs().sum() > 0
        encoder.zero_grad(set_to_none=True)


def test_prompt_conditioning_equals_diffusers_encode_prompt(parts):
    pipe = StableDiffusionXLPipeline(**{k: v for k, v in parts.as_dict().items()})
    prompts, prompts_2 = ["a red circle", "a blue square"], ["a circle", "a square, blue"]
    embeds, pooled = encode_prompts_xl(
        parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2, prompts, prompts_2
    )
    theirs = pipe.encode_prompt(prompts, prompt_2=prompts_2, do_classifier_free_guidance=False)
    assert torch.equal(embeds, theirs[0]) and torch.equal(pooled, theirs[2])
    ids = pipe._get_add_time_ids(
        (40, 48), (4, 8), (32, 32), torch.float32, parts.text_encoder_2.config.projection_dim
    )
    assert torch.equal(add_time_ids((40, 48), (4, 8), (32, 32)), ids[0])
    assert add_time_ids([[40, 48]] * 3, [[4, 8]] * 3, [[32, 32]] * 3).shape == (3, 6)
    with pytest.raises(ValueError, match="two numbers each"):
        add_time_ids((40, 48, 1), (0, 0), (32, 32))


def test_a_half_sd1_half_sdxl_folder_is_refused_before_any_weight_is_read(folder, sd1_folder, tmp_path):
    model = copy_of(folder, tmp_path)
    shutil.rmtree(model / "unet")
    shutil.copytree(sd1_folder / "unet", model / "unet")
    for weights in model.glob("*/*.safetensors"):
        weights.write_bytes(b"not safetensors")  # any weight read would fail differently
    with pytest.raises(ModelFolderError) as e:
        load_components_xl(model)
    message = str(e.value)
    assert "half SD 1.x/2.x and half SDXL" in message
    assert "unet/ is an SD 1.x/2.x U-Net (cross_attention_dim 64" in message
    assert (
        "text_encoder_2/ is present" in message
        and "model_index.json names StableDiffusionXLPipeline" in message
    )
    assert "Expected every part from one SDXL model" in message


def test_an_sdxl_unet_in_an_sd1_folder_is_named(folder, sd1_folder, tmp_path):
    model = copy_of(sd1_folder, tmp_path)
    shutil.rmtree(model / "unet")
    shutil.copytree(folder / "unet", model / "unet")
    with pytest.raises(
        ModelFolderError, match=r"there is no text_encoder_2/.*but unet/ has SDXL's text_time"
    ):
        load_components_xl(model)


def test_an_sd1_folder_is_sent_to_the_sd1_loader(sd1_folder):
    assert not is_xl_folder(sd1_folder)
    with pytest.raises(ModelFolderError, match="is not SDXL .*load it with sdlite.models.load_components"):
        load_components_xl(sd1_folder)


def test_text_encoders_of_another_width_are_named_with_both_widths(folder, sd1_folder, tmp_path):
    model = copy_of(folder, tmp_path)
    shutil.rmtree(model / "text_encoder")
    shutil.copytree(sd1_folder / "text_encoder", model / "text_encoder")  # 64 wide, not 32
    with pytest.raises(ModelFolderError, match=r"cross_attention_dim is 96 but .* 64 \+ 64 = 128"):
        load_components_xl(model)


def test_pickled_only_weights_are_refused(parts, folder, tmp_path):
    model = copy_of(folder, tmp_path)
    (model / "text_encoder_2" / "model.safetensors").unlink()
    torch.save(parts.text_encoder_2.state_dict(), model / "text_encoder_2" / "pytorch_model.bin")
    with pytest.raises(
        ModelFolderError, match="no model.safetensors; sdlite reads SDXL weights from safetensors"
    ):
        load_components_xl(model)


def test_text_encoder_2_weights_that_do_not_fit_its_config_are_named(folder, tmp_path):
    model = copy_of(folder, tmp_path)
    config = json.loads((model / "text_encoder_2" / "config.json").read_text())
    config["intermediate_size"] = 128  # the weights' MLP is 256 wide
    (model / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ModelFolderError, match=r"fc1.weight' has shape \(256, 64\) but .* makes it \(128, 64\)"
    ):
        load_components_xl(model)


def refiner_copy_of(folder, tmp_path):
    """The folder as SDXL's refiner lays it out: no text_encoder/ or tokenizer/, a U-Net reading
    text_encoder_2's states alone (its config is all the checks read)."""
    model = copy_of(folder, tmp_path)
    shutil.rmtree(model / "text_encoder")
    shutil.rmtree(model / "tokenizer")
    te2 = json.loads((model / "text_encoder_2" / "config.json").read_text())
    unet = json.loads((model / "unet" / "config.json").read_text())
    unet["cross_attention_dim"] = te2["hidden_size"]
    unet["projection_class_embeddings_input_dim"] -= unet["addition_time_embed_dim"]  # five time ids
    (model / "unet" / "config.json").write_text(json.dumps(unet))
    return model


def test_a_refiner_folder_passes_the_check_when_asked_and_is_sent_to_the_image_pipelines_otherwise(
    folder, tmp_path
):
    model = refiner_copy_of(folder, tmp_path)
    assert is_refiner_folder(model) and not is_refiner_folder(folder)
    assert check_folder_xl(model, weights=False, refiner=True) == model
    with pytest.raises(ModelFolderError, match="is an SDXL refiner .* ImageToImageXLPipeline or Inpaint"):
        load_components_xl(model)


def test_a_base_folder_without_its_text_encoder_is_not_taken_for_a_refiner(folder, tmp_path):
    model = copy_of(folder, tmp_path)
    shutil.rmtree(model / "text_encoder")  # its U-Net still reads both encoders' widths
    assert not is_refiner_folder(model)
    with pytest.raises(ModelFolderError, match="has no text_encoder: expected text_encoder/config.json"):
        check_folder_xl(model, refiner=True)
