"""LoRA on SDXL: U-Net and both encoders, as diffusers loads it; a LoRA of the other family is refused."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from pipelines import TextToImageXLPipeline
from pipelines.lora_check import check_lora_fits
from sdlite.lora import LoraSettings, add_lora, save_lora
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory):
    """A random (non-zero) adapter on the U-Net and both encoders, written as diffusers writes SDXL's."""
    parts = build_components_xl("tiny-sdxl", seed=1)
    settings = LoraSettings(rank=2, alpha=4)  # peft's init: A random, B zero (set below)
    add_lora(parts.unet, None, settings)
    layers = {}
    for name in ("text_encoder", "text_encoder_2"):
        inject_adapter_in_model(settings.config(settings.text_encoder_targets), getattr(parts, name))
    torch.manual_seed(0)
    for model in (parts.unet, parts.text_encoder, parts.text_encoder_2):
        for key, p in model.named_parameters():
            if "lora_B" in key:
                p.data = torch.randn_like(p) * 0.3  # B starts at zero: make the adapter do something
    for name in ("unet", "text_encoder", "text_encoder_2"):
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(getattr(parts, name))
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd1_lora(tmp_path_factory):
    parts = build_components("tiny", seed=0)
    add_lora(parts.unet, parts.text_encoder, LoraSettings(rank=2, text_encoder=True))
    return save_lora(tmp_path_factory.mktemp("sd1-lora"), parts.unet, parts.text_encoder)


def pipelines():
    parts = build_components_xl("tiny-sdxl", seed=0)
    ours = TextToImageXLPipeline(**parts.as_dict())
    theirs = StableDiffusionXLPipeline(
        **build_components_xl("tiny-sdxl", seed=0).as_dict(), add_watermarker=False
    )
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


def images(pipe, **kwargs):
    kwargs = {"num_inference_steps": 3, "output_type": "np", "guidance_scale": 4.0, **kwargs}
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs).images


def test_sdxl_lora_on_unet_and_both_encoders_gives_diffusers_images(sdxl_lora):
    ours, theirs = pipelines()
    before = images(ours)
    for pipe in (ours, theirs):
        pipe.load_lora_weights(sdxl_lora)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert any("lora_A" in k for k, _ in getattr(ours, name).named_parameters()), name
    after = images(ours)
    assert np.abs(after - before).max() > 1e-2  # the adapter changes the images
    assert np.abs(after - images(theirs)).max() <= 1e-4
    half = dict(cross_attention_kwargs={"scale": 0.5})
    assert np.abs(images(ours, **half) - images(theirs, **half)).max() <= 1e-4


def test_fuse_then_unfuse_restores_all_three_models_exactly(sdxl_lora):
    ours, _ = pipelines()
    ours.load_lora_weights(sdxl_lora)
    weights = {n: {k: v.clone() for k, v in getattr(ours, n).state_dict().items()}
               for n in ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
    unfused = images(ours)
    ours.fuse_lora()
    assert np.abs(images(ours) - unfused).max() <= 1e-3  # W + (alpha/r) B A rounds unlike the two branches
    q = next(k for k in weights["text_encoder_2"] if "q_proj.base_layer.weight" in k)
    assert not torch.equal(ours.text_encoder_2.state_dict()[q], weights["text_encoder_2"][q])  # fused in
    ours.unfuse_lora()
    for name, saved in weights.items():
        now = getattr(ours, name).state_dict()
        assert all(torch.equal(now[k], v) for k, v in saved.items()), name


def test_sd1_lora_into_sdxl_fails_naming_both_and_changes_nothing(sd1_lora):
    ours, _ = pipelines()
    weights = {k: v.clone() for k, v in ours.unet.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit the SDXL model") as error:
        ours.load_lora_weights(sd1_lora.parent)
    message = str(error.value)
    assert "one text encoder" in message and "nothing was loaded" in message
    assert "cross-attention width 96" in message
    assert ours.unet.state_dict().keys() == weights.keys()  # no adapter layers were injected
    assert all(torch.equal(ours.unet.state_dict()[k], v) for k, v in weights.items())
    assert not getattr(ours.unet, "peft_config", None) and not getattr(ours.text_encoder, "peft_config", None)


def test_sdxl_lora_checked_against_an_sd1_model_names_text_encoder_2(sdxl_lora):
    """The check the SD 1.x pipeline can make with the same function: an SDXL LoRA does not fit."""
    from diffusers.loaders import StableDiffusionXLLoraLoaderMixin

    state, _ = StableDiffusionXLLoraLoaderMixin.lora_state_dict(sdxl_lora, local_files_only=True)
    sd1 = build_components("tiny", seed=0)
    models = {"unet": sd1.unet, "text_encoder": sd1.text_encoder}
    with pytest.raises(ValueError, match=r"weights for \['text_encoder_2'\].*made for SDXL"):
        check_lora_fits(state, models, "SD 1.x")


def test_sd1_pipeline_refuses_an_sdxl_lora_naming_it_and_changes_nothing(sdxl_lora):
    from pipelines import TextToImagePipeline

    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"does not fit the SD 1.x/2.x model.*text_encoder_2.*made for SDXL"):
        pipe.load_lora_weights(sdxl_lora)
    assert pipe.unet.state_dict().keys() == weights.keys()  # no adapter layers were injected
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())
    assert not getattr(pipe.unet, "peft_config", None) and not getattr(pipe.text_encoder, "peft_config", None)


def test_sdxl_pipeline_refuses_a_pickled_lora_naming_the_file(sdxl_lora, tmp_path):
    from safetensors.torch import load_file

    state = load_file(next(sdxl_lora.glob("*.safetensors")))
    torch.save(state, tmp_path / "lora.bin")
    ours, _ = pipelines()
    with pytest.raises(ValueError, match=r"lora.bin.*is a pickle"):
        ours.load_lora_weights(tmp_path / "lora.bin")
    assert not getattr(ours.unet, "peft_config", None)
