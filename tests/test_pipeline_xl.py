"""TextToImageXLPipeline: the images of diffusers' StableDiffusionXLPipeline, and its folders and files."""

import fractions
import json

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

from pipelines import TextToImageXLPipeline
from pipelines.single_file import save_single_file
from sdlite.models import ModelFolderError, build_components
from sdlite.models_xl import build_components_xl

PROMPTS = ["a red circle", "a blue square on green"]


@pytest.fixture(scope="module")
def parts():
    return build_components_xl("tiny-sdxl", seed=0)


@pytest.fixture(scope="module")
def ours(parts):
    pipe = TextToImageXLPipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def theirs(parts):
    pipe = StableDiffusionXLPipeline(**parts.as_dict(), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, **kwargs):
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 4, "output_type": "np", **kwargs}
    return pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images


def assert_same_images(ours, theirs, **kwargs):
    a, b = images(ours, **kwargs), images(theirs, **kwargs)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1e-4


CASES = {
    "without_guidance": dict(guidance_scale=1.0),
    "with_guidance": dict(guidance_scale=5.0),
    "with_negative_prompt_and_prompt_2": dict(
        guidance_scale=5.0, negative_prompt="blurry", prompt_2=["circle", "square"], negative_prompt_2="dark"
    ),
    # One prompt: with several and negative sizes, diffusers pairs the halves' time ids [neg, pos, neg,
    # pos] with embeddings [neg, neg, pos, pos] (its add_time_ids.repeat), which we do not copy.
    "with_size_conditioning": dict(
        prompt=PROMPTS[1],
        guidance_scale=4.0,
        original_size=(64, 48),
        crops_coords_top_left=(8, 4),
        target_size=(32, 32),
        negative_original_size=(16, 16),
        negative_crops_coords_top_left=(2, 0),
        negative_target_size=(24, 24),
    ),  # fmt: skip
    "with_two_images_per_prompt_and_guidance_rescale": dict(num_images_per_prompt=2, guidance_rescale=0.7),
    "at_another_size": dict(height=48, width=32),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_same_images_as_diffusers_sdxl(ours, theirs, case):
    assert_same_images(ours, theirs, **CASES[case])


def test_same_images_as_diffusers_with_a_diffusers_scheduler(parts):
    scheduler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    components = {**parts.as_dict(), "scheduler": scheduler}
    ours = TextToImageXLPipeline(**components)
    theirs = StableDiffusionXLPipeline(**components, add_watermarker=False)
    assert_same_images(ours, theirs, guidance_scale=3.0)


def test_empty_negative_prompt_is_encoded_when_force_zeros_is_off(parts):
    ours = TextToImageXLPipeline(**parts.as_dict(), force_zeros_for_empty_prompt=False)
    theirs = StableDiffusionXLPipeline(
        **parts.as_dict(), force_zeros_for_empty_prompt=False, add_watermarker=False
    )
    assert_same_images(ours, theirs, guidance_scale=5.0)
    _, negative, _, negative_pooled = ours.encode_prompt("a cat", device="cpu")
    assert negative.abs().sum() > 0 and negative_pooled.abs().sum() > 0


def test_prompt_embeds_give_the_images_of_their_prompt(ours):
    embeds, negative, pooled, negative_pooled = ours.encode_prompt(PROMPTS, device="cpu", negative_prompt="x")
    from_embeds = images(
        ours, prompt=None, prompt_embeds=embeds, negative_prompt_embeds=negative,
        pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
    )  # fmt: skip
    assert np.abs(from_embeds - images(ours, negative_prompt="x")).max() <= 1e-6


def test_prompt_embeds_without_pooled_embeds_are_refused(ours):
    embeds, *_ = ours.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        ours(prompt_embeds=embeds, num_inference_steps=2)


def test_step_end_callback_can_change_the_added_conditioning_and_the_guidance(ours):
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append(sorted(tensors))
        pipe._guidance_scale += 1.0
        return {"add_time_ids": tensors["add_time_ids"] * 0}

    ours(PROMPTS[0], num_inference_steps=3, callback_on_step_end=callback,
         callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs)  # fmt: skip
    assert seen[0] == sorted(ours._callback_tensor_inputs) and len(seen) == 3
    assert ours.guidance_scale == 5.0 + ours.num_timesteps


def test_float16_vae_with_force_upcast_decodes_in_float32_and_stays_float16(parts):
    vae = type(parts.vae).from_config({**parts.vae.config, "force_upcast": True})
    vae.load_state_dict(parts.vae.state_dict())
    pipe = TextToImageXLPipeline(**{**parts.as_dict(), "vae": vae.half()})
    out = pipe(PROMPTS[0], num_inference_steps=2, output_type="pt", progress=False).images
    assert out.dtype == torch.float32 and pipe.vae.dtype == torch.float16
    assert not any(p.is_inference() for p in pipe.vae.parameters())  # still trainable


# ---- folders and single files -----------------------------------------------------------------


@pytest.mark.parametrize("writer", ["ours", "diffusers"])
def test_from_pretrained_reads_an_sdxl_folder_and_gives_the_same_images(ours, theirs, writer, tmp_path):
    (ours if writer == "ours" else theirs).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    loaded = TextToImageXLPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is type(ours.scheduler)
    assert np.abs(images(loaded, guidance_scale=5.0) - images(ours, guidance_scale=5.0)).max() <= 1e-6
    if writer == "ours":  # and diffusers reads what we wrote
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        other = StableDiffusionXLPipeline.from_pretrained(tmp_path, add_watermarker=False)
        assert np.abs(images(other, guidance_scale=5.0) - images(ours, guidance_scale=5.0)).max() <= 1e-4


def test_from_pretrained_refuses_an_sd1_folder_naming_it(tmp_path):
    folder = build_components("tiny", seed=0).save_pretrained(tmp_path / "sd1")
    with pytest.raises(ModelFolderError, match="is not SDXL"):
        TextToImageXLPipeline.from_pretrained(folder)


def test_single_file_round_trip_gives_the_same_images(ours, tmp_path):
    file = ours.save_single_file(tmp_path / "tiny-sdxl.safetensors")
    loaded = TextToImageXLPipeline.from_single_file(file, config="tiny-sdxl")
    assert np.abs(images(loaded, guidance_scale=5.0) - images(ours, guidance_scale=5.0)).max() <= 1e-6


def test_from_single_file_refuses_an_sd1_checkpoint_naming_its_layout(tmp_path):
    sd1 = build_components("tiny", seed=0)
    file = save_single_file(sd1.unet, sd1.vae, sd1.text_encoder, tmp_path / "sd1.safetensors")
    with pytest.raises(
        ValueError, match="SD 1.x single-file checkpoint, not SDXL.*TextToImagePipeline.from_single_file"
    ):
        TextToImageXLPipeline.from_single_file(file, config="tiny-sdxl")


def test_each_image_of_a_batch_gets_its_own_halves_size_conditioning(ours):
    """Where diffusers' repeat of [neg, pos] time ids mispairs them, each image here is the one its
    prompt gives alone."""
    sizes = dict(
        original_size=(64, 48), crops_coords_top_left=(8, 4), negative_original_size=(16, 16),
        negative_target_size=(24, 24), guidance_scale=4.0, num_inference_steps=3, output_type="np",
    )  # fmt: skip
    batch = ours(PROMPTS, generator=[torch.Generator().manual_seed(i) for i in range(2)], **sizes).images
    for i, prompt in enumerate(PROMPTS):
        alone = ours(prompt, generator=torch.Generator().manual_seed(i), **sizes).images[0]
        assert np.abs(batch[i] - alone).max() <= 1e-5


def test_pickled_weights_that_hold_only_tensors_load_and_others_are_refused(ours, tmp_path):
    ours.save_pretrained(tmp_path, safe_serialization=False)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["scheduler"][0] == "diffusers"
    loaded = TextToImageXLPipeline.from_pretrained(tmp_path)
    assert np.abs(images(loaded, guidance_scale=5.0) - images(ours, guidance_scale=5.0)).max() <= 1e-6
    state = torch.load(tmp_path / "vae" / "diffusion_pytorch_model.bin", weights_only=True)
    torch.save({**state, "note": fractions.Fraction(1, 3)}, tmp_path / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="pickled objects other than tensors"):
        TextToImageXLPipeline.from_pretrained(tmp_path)


def test_sd_pipeline_from_pretrained_refuses_an_sdxl_folder_naming_the_xl_pipeline(ours, tmp_path):
    from pipelines import TextToImagePipeline

    ours.save_pretrained(tmp_path)
    with pytest.raises(ModelFolderError, match="SDXL model folder.*TextToImageXLPipeline.from_pretrained"):
        TextToImagePipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "bad, named",
    [
        (dict(original_size=(64,)), "original_size"),
        (dict(negative_crops_coords_top_left=(-1, 0)), "negative_crops_coords_top_left"),
        (dict(prompt_2=["one"]), "prompt_2 has 1 entries but there are 2 prompts"),
        (dict(denoising_end=1.5), "denoising_end"),
        (dict(clip_skip=1), "clip_skip"),  # tiny-sdxl's encoders have 2 layers: SDXL reads the penultimate
        (dict(callback_on_step_end_tensor_inputs=["negative_prompt_embeds"]), "callback_on_step_end"),
    ],
    ids=["size", "crop", "prompt_2", "denoising_end", "clip_skip", "callback_name"],
)
def test_sdxl_arguments_are_checked_before_any_work_naming_them(ours, bad, named):
    calls = []
    hook = ours.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=named):
            ours(PROMPTS, num_inference_steps=2, **bad)
    finally:
        hook.remove()
    assert not calls  # refused before the U-Net ran
