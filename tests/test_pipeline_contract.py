"""TextToImagePipeline keeps diffusers' StableDiffusionPipeline contract: the components it takes and
saves, the step-end callback, custom sigmas, variants, FreeU and fused QKV, the scheduler corrections,
the truncation warning, and IP-Adapter. Where diffusers' class can run the same call, images are
compared with its own."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import CLIPConfig, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from pipelines import TextToImagePipeline
from sdlite.models import build_components

STEPS = 3


def gen(n=0):
    return torch.Generator().manual_seed(n)


@pytest.fixture(scope="module")
def parts():
    return build_components("tiny", seed=0)


def ours_and_theirs(parts, scheduler=None):
    """Our pipeline and diffusers', sharing the models, each with its own copy of one scheduler."""
    models = {k: v for k, v in parts.as_dict().items() if k != "scheduler"}
    scheduler = scheduler or parts.scheduler
    ours = TextToImagePipeline(**models, scheduler=copy.deepcopy(scheduler))
    theirs = StableDiffusionPipeline(
        **models, scheduler=copy.deepcopy(scheduler), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


def run(pipe, **kw):
    kw = dict(num_inference_steps=STEPS, generator=gen(), output_type="np", guidance_scale=5.0) | kw
    return pipe("a red circle", **kw).images


# ---- components ------------------------------------------------------------------------------


def test_takes_diffusers_components_including_the_optional_ones(parts):
    _, theirs = ours_and_theirs(parts)
    pipe = TextToImagePipeline(**theirs.components)
    assert {"safety_checker", "feature_extractor", "image_encoder"} <= pipe.components.keys()
    assert pipe.safety_checker is None and pipe.image_encoder is None
    out = pipe("a", num_inference_steps=1, output_type="np", return_dict=False)
    assert out[0].shape == (1, 32, 32, 3) and out[1] is None  # (images, nsfw flags): no checker


def test_optional_components_save_as_null_and_load_in_both(parts, tmp_path):
    ours, _ = ours_and_theirs(parts)
    ours.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["safety_checker"] == index["image_encoder"] == [None, None]
    assert index["requires_safety_checker"] is False
    for cls in (TextToImagePipeline, StableDiffusionPipeline):
        loaded = cls.from_pretrained(tmp_path, local_files_only=True)
        assert loaded.safety_checker is None and loaded.feature_extractor is None


def test_a_feature_extractor_is_saved_and_loaded_back(parts, tmp_path):
    ours, _ = ours_and_theirs(parts)
    ours.register_modules(feature_extractor=CLIPImageProcessor(crop_size=24, size=24))
    ours.save_pretrained(tmp_path)
    loaded = TextToImagePipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.feature_extractor, CLIPImageProcessor)
    assert loaded.feature_extractor.crop_size["height"] == 24


def test_a_safety_checker_without_its_feature_extractor_is_refused(parts):
    with pytest.raises(ValueError, match="feature_extractor"):
        TextToImagePipeline(**parts.as_dict(), safety_checker=torch.nn.Identity())


@pytest.mark.parametrize("flag_all", [False, True], ids=["passed", "flagged"])
def test_a_safety_checker_runs_as_in_diffusers(parts, flag_all):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    checker = StableDiffusionSafetyChecker(
        CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)
    )
    if flag_all:  # every concept's threshold far below any score
        checker.concept_embeds_weights.data.fill_(-10.0)
    extras = dict(safety_checker=checker.eval(), feature_extractor=CLIPImageProcessor(crop_size=32, size=32))
    ours = TextToImagePipeline(**parts.as_dict(), **extras)
    theirs = StableDiffusionPipeline(**parts.as_dict(), **extras, image_encoder=None)
    a, b = (p(["a", "b"], num_inference_steps=2, generator=gen(), output_type="np") for p in (ours, theirs))
    assert a.nsfw_content_detected == b.nsfw_content_detected == [flag_all, flag_all]
    assert np.abs(a.images - b.images).max() <= 1e-5
    assert (a.images.max() == 0) == flag_all  # flagged images come back black


def test_save_pretrained_variant_writes_and_loads_variant_files(parts, tmp_path):
    ours, _ = ours_and_theirs(parts)
    ours.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / "text_encoder" / "model.fp16.safetensors").is_file()
    reference = run(ours)
    for cls in (TextToImagePipeline, StableDiffusionPipeline):
        loaded = cls.from_pretrained(tmp_path, variant="fp16", local_files_only=True)
        loaded.set_progress_bar_config(disable=True)
        assert np.abs(run(loaded) - reference).max() <= 1e-5


def test_encode_prompt_needs_only_the_tokenizer_and_text_encoder(parts):
    full, _ = ours_and_theirs(parts)
    bare = TextToImagePipeline(
        vae=None, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=None, scheduler=None
    )
    a = bare.encode_prompt("a red circle", "cpu", 2, True, "blurry")
    b = full.encode_prompt("a red circle", "cpu", 2, True, "blurry")
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and a[0].shape[0] == 2


def test_a_pipeline_without_text_encoder_runs_from_embeddings(parts):
    full, _ = ours_and_theirs(parts)
    embeds, negative = full.encode_prompt("a red circle", "cpu", 1, True)
    models = parts.as_dict() | {"text_encoder": None, "tokenizer": None}
    bare = TextToImagePipeline(**models)
    bare.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, generator=gen(), output_type="np", guidance_scale=5.0)
    out = bare(prompt_embeds=embeds, negative_prompt_embeds=negative, **kw).images
    assert np.abs(out - run(full)).max() <= 1e-5
    with pytest.raises(ValueError, match="prompt needs a text encoder"):
        run(bare)


# ---- the step-end callback -------------------------------------------------------------------


def test_callback_sees_every_tensor_input_and_the_step_count(parts):
    ours, _ = ours_and_theirs(parts)
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, sorted(tensors), pipe.num_timesteps))
        assert tensors["prompt_embeds"].shape[0] == 2 * tensors["negative_prompt_embeds"].shape[0]
        return tensors

    run(ours, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=ours._callback_tensor_inputs)
    assert seen == [(i, sorted(ours._callback_tensor_inputs), STEPS) for i in range(STEPS)]
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        run(ours, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_guidance_scale_changed_by_a_callback_is_used_from_the_next_step_as_in_diffusers(parts):
    ours, theirs = ours_and_theirs(parts)

    def raise_guidance(pipe, i, t, tensors):
        pipe._guidance_scale += 4.0
        return tensors

    a, b = (run(p, callback_on_step_end=raise_guidance) for p in (ours, theirs))
    assert ours.guidance_scale == 5.0 + 4.0 * STEPS
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - run(ours)).max() > 1e-3  # the change took effect


def test_interrupt_stops_after_the_step_that_set_it(parts):
    ours, _ = ours_and_theirs(parts)
    steps = []
    run(
        ours, callback_on_step_end=lambda p, i, t, k: steps.append(k["latents"].clone()), output_type="latent"
    )

    def stop_at_1(pipe, i, t, tensors):
        pipe._interrupt = i == 1
        return tensors

    stopped = run(ours, callback_on_step_end=stop_at_1, output_type="latent")
    assert torch.equal(stopped, steps[1]) and not torch.equal(stopped, steps[-1])


# ---- schedules -------------------------------------------------------------------------------


def test_custom_sigmas_give_diffusers_images(parts):
    euler = EulerDiscreteScheduler.from_config(parts.scheduler.config)
    ours, theirs = ours_and_theirs(parts, euler)
    sigmas = [14.6, 6.0, 2.0, 0.5, 0.0]  # an Align-Your-Steps-like list, ending at the final sigma
    a, b = (run(p, sigmas=sigmas) for p in (ours, theirs))
    assert ours.num_timesteps == theirs.num_timesteps == 4
    assert np.abs(a - b).max() <= 1e-4 and np.abs(a - run(ours)).max() > 1e-3


def test_sigmas_with_a_scheduler_that_takes_none_is_a_clear_error(parts):
    ours, _ = ours_and_theirs(parts)
    with pytest.raises(ValueError, match="sigmas= needs a scheduler"):
        run(ours, sigmas=[10.0, 1.0])


def test_scheduler_config_corrected_as_diffusers_constructor_does(parts, caplog):
    ddim = DDIMScheduler.from_config(parts.scheduler.config | {"steps_offset": 0, "clip_sample": True})
    with caplog.at_level(logging.WARNING):
        ours, theirs = ours_and_theirs(parts, ddim)
    assert "steps_offset" in caplog.text and "clip_sample" in caplog.text
    assert ours.scheduler.config.steps_offset == 1 and ours.scheduler.config.clip_sample is False
    assert np.abs(run(ours) - run(theirs)).max() <= 1e-4


# ---- StableDiffusionMixin --------------------------------------------------------------------


def test_freeu_changes_images_and_disabling_restores_them(parts):
    ours, _ = ours_and_theirs(copy.deepcopy(parts))
    reference = run(ours)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    assert np.abs(run(ours) - reference).max() > 1e-3
    ours.disable_freeu()
    assert np.array_equal(run(ours), reference)


def test_fused_qkv_projections_keep_the_images(parts):
    ours, _ = ours_and_theirs(copy.deepcopy(parts))
    reference = run(ours)
    ours.fuse_qkv_projections()
    assert np.abs(run(ours) - reference).max() <= 1e-4
    ours.unfuse_qkv_projections()
    assert np.abs(run(ours) - reference).max() <= 1e-4


# ---- prompts ---------------------------------------------------------------------------------


def test_truncation_warning_names_the_cut_off_text(parts, caplog):
    ours, _ = ours_and_theirs(parts)  # the tiny preset reads 16 tokens
    prompt = "a red circle on a blue square beside a green triangle under a yellow star and a purple moon"
    with caplog.at_level(logging.WARNING):
        ours.encode_prompt(prompt, "cpu", 1, False)
    assert "purple moon" in caplog.text and "16 tokens" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ours.encode_prompt("a red circle", "cpu", 1, False)
    assert caplog.text == ""


# ---- IP-Adapter ------------------------------------------------------------------------------


def ip_adapter_state_dict(unet, tokens=4, seed=0):
    """A random IP-Adapter in the original file's layout: image projection + one (to_k_ip, to_v_ip) per
    cross-attention layer, numbered 1, 3, 5... in the U-Net's processor order."""
    torch.manual_seed(seed)
    cross, adapter, key = unet.config.cross_attention_dim, {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):
            shape = unet.get_submodule(name.removesuffix(".processor")).to_k.weight.shape
            adapter[f"{key}.to_k_ip.weight"] = torch.randn(shape) * 0.3
            adapter[f"{key}.to_v_ip.weight"] = torch.randn(shape) * 0.3
            key += 2
    projection = {
        "proj.weight": torch.randn(cross * tokens, cross) * 0.1,
        "proj.bias": torch.zeros(cross * tokens),
        "norm.weight": torch.ones(cross),
        "norm.bias": torch.zeros(cross),
    }
    return {"image_proj": projection, "ip_adapter": adapter}


@pytest.fixture
def ip_pipes(parts):
    ours, theirs = ours_and_theirs(copy.deepcopy(parts))
    plain = run(ours)
    ours.load_ip_adapter(
        ip_adapter_state_dict(ours.unet), subfolder="", weight_name="", image_encoder_folder=None
    )
    return ours, theirs, plain  # they share the U-Net, now with the adapter


def test_ip_adapter_embeds_steer_the_images_as_in_diffusers(parts, ip_pipes):
    ours, theirs, plain = ip_pipes
    embeds = [torch.randn(2, 1, parts.unet.config.cross_attention_dim, generator=gen(1))]  # [uncond; cond]
    ours.set_ip_adapter_scale(0.0)
    assert np.abs(run(ours, ip_adapter_image_embeds=embeds) - plain).max() <= 1e-5
    ours.set_ip_adapter_scale(1.0)
    a, b = (run(p, ip_adapter_image_embeds=embeds, num_images_per_prompt=2) for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1e-4 and np.abs(a[:1] - plain).max() > 1e-3
    with pytest.raises(ValueError, match="IP-Adapter.*loaded"):
        run(ours)


def test_ip_adapter_image_goes_through_the_image_encoder_as_in_diffusers(parts, ip_pipes):
    ours, theirs, _ = ip_pipes
    torch.manual_seed(0)
    width = parts.unet.config.cross_attention_dim
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(hidden_size=32, projection_dim=width, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, image_size=32, patch_size=8)
    )  # fmt: skip
    processor = CLIPImageProcessor(crop_size=32, size=32)
    for p in (ours, theirs):
        p.register_modules(image_encoder=encoder, feature_extractor=processor)
    image = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)
    a, b = (run(p, ip_adapter_image=image) for p in (ours, theirs))
    assert np.abs(a - b).max() <= 1e-4
    cond, uncond = ours.encode_image(image, "cpu", 1)
    embeds = [torch.cat([uncond, cond])[:, None]]
    assert np.abs(run(ours, ip_adapter_image_embeds=embeds) - a).max() <= 1e-5


def test_ip_adapter_inputs_without_an_adapter_are_a_clear_error(parts):
    ours, _ = ours_and_theirs(parts)
    with pytest.raises(ValueError, match="load_ip_adapter"):
        run(ours, ip_adapter_image_embeds=[torch.zeros(2, 1, 64)])
