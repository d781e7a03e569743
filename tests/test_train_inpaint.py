"""Training an inpainting U-Net (training/inpaint_step.py, ``inpainting: true``) on the tiny presets."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import InpaintPipeline
from sdlite.models import build_components, load_components
from sdlite.models_xl import build_components_xl
from tests.test_train import assert_same_training, flags, launch, run_killed_at, weights
from training.config import ConfigError, parse_config
from training.config.unet import TrainConfig
from training.inpaint_step import draw_inpaint, inpaint_inputs, widen_conv_in
from training.train import main

INPAINT = dict(inpainting="true", cache_latents="false")


def grey_square_call() -> dict:
    """An inpainting call both pipelines take: a grey 32 px image, its middle 16 px square masked."""
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    image = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    return dict(prompt="a red circle", image=image, mask_image=Image.fromarray(mask), num_inference_steps=3,
                output_type="np")  # fmt: skip


@pytest.mark.parametrize("build", [lambda: build_components("tiny", seed=0),
                                   lambda: build_components_xl("tiny-sdxl", seed=0)])  # fmt: skip
def test_the_widened_u_net_predicts_the_bases_epsilon_whatever_the_mask(build):
    parts = build()
    base, unet = parts.unet, copy.deepcopy(parts.unet)
    assert widen_conv_in(unet, 4) and unet.config.in_channels == 9
    assert not widen_conv_in(unet, 4)  # an inpainting U-Net is left as it is
    g = torch.Generator().manual_seed(0)
    x_t, extra = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 8, 8, generator=g)
    t, c = torch.tensor([10, 900]), torch.randn(2, 77, base.config.cross_attention_dim, generator=g)
    kwargs = {}
    if base.config.addition_embed_type == "text_time":  # SDXL's pooled embedding and time ids
        pooled = torch.randn(
            2,
            base.config.projection_class_embeddings_input_dim - 6 * base.config.addition_time_embed_dim,
            generator=g,
        )
        kwargs["added_cond_kwargs"] = {
            "text_embeds": pooled,
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    with torch.no_grad():
        before = base(x_t, t, encoder_hidden_states=c, **kwargs).sample
        after = unet(torch.cat([x_t, extra], 1), t, encoder_hidden_states=c, **kwargs).sample
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)


def test_a_u_net_of_another_width_is_refused():
    unet = build_components("tiny", seed=0).unet
    unet.conv_in = torch.nn.Conv2d(6, unet.conv_in.out_channels, 3, padding=1)
    with pytest.raises(ValueError, match="takes 6 input channels"):
        widen_conv_in(unet, 4)


def draw(step, G, seed=0, full=0.25, kinds=("rectangle", "stroke"), sizes=(0.2, 0.8)):
    return draw_inpaint(seed, step, G, (4, 8, 8), 4, full, list(kinds), list(sizes), "cpu")


def test_masks_are_a_function_of_seed_step_and_example_alone():
    a, b = draw(3, 8), draw(3, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(draw(3, 4)["mask"], a["mask"][:4])  # example i's mask whatever the batch
    assert not torch.equal(draw(4, 8)["mask"], a["mask"]) and not torch.equal(
        draw(3, 8, seed=1)["mask"], a["mask"]
    )
    masks = a["mask"]
    assert masks.shape == (8, 1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}


def test_mask_settings_shape_the_masks():
    assert (draw(0, 16, full=0.9999)["mask"] == 1).all()  # (< 1: the rate of whole-image masks)
    rectangles = draw(0, 64, full=0.0, kinds=("rectangle",), sizes=(0.25, 0.5))["mask"][:, 0]
    for mask in rectangles:
        rows, cols = mask.any(1).sum().item(), mask.any(0).sum().item()
        assert 7 <= rows <= 17 and 7 <= cols <= 17 and mask.sum() == rows * cols  # a filled rectangle
    strokes = draw(0, 64, full=0.0, kinds=("stroke",))["mask"]
    assert 0 < strokes.mean() < 1 and not torch.equal(strokes, rectangles[:, None])


def test_the_masked_image_is_the_image_with_the_masked_pixels_set_to_zero():
    vae = build_components("tiny", seed=0).vae
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[:, :, 8:24, 4:20] = 1
    noise = torch.zeros(2, 4, 8, 8)  # the posterior's mean
    got = inpaint_inputs(pixels, mask, vae, noise)
    assert got.shape == (2, 5, 8, 8) and torch.equal(got[:, :1], mask[:, :, ::4, ::4])
    with torch.no_grad():
        mean = vae.encode(pixels * (1 - mask)).latent_dist.mean
    torch.testing.assert_close(got[:, 1:], mean * vae.config.scaling_factor)


@pytest.fixture(scope="module")
def trained(data, cache, tmp_path_factory):
    """An inpainting U-Net trained 3 steps from the tiny preset, with held-out loss and samples."""
    out = tmp_path_factory.mktemp("inpaint")
    main(flags(data, cache, out, val_data_dir=data / "test", validation_prompts='["a red circle"]',
               validation_inference_steps=2, **INPAINT))  # fmt: skip
    return out


def test_the_final_folder_is_a_9_channel_model_that_inpaints_as_diffusers_does(trained):
    from diffusers import StableDiffusionInpaintPipeline

    final = trained / "final"
    assert load_components(final, inpainting=True).unet.config.in_channels == 9
    assert (trained / "validation" / "step-3.png").is_file()  # sampled with a full mask
    call = grey_square_call()
    ours = InpaintPipeline.from_pretrained(final)
    theirs = StableDiffusionInpaintPipeline.from_pretrained(final, local_files_only=True, safety_checker=None)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    a = ours(**call, generator=torch.Generator().manual_seed(0)).images
    b = theirs(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 1e-4


def test_a_9_channel_base_trains_on_as_it_is(trained, data, cache, tmp_path):
    main(flags(data, cache, tmp_path, pretrained=trained / "final", max_steps=1, ema_decay="none", **INPAINT))
    before, after = weights(trained / "final"), weights(tmp_path / "final")
    assert after["conv_in.weight"].shape == before["conv_in.weight"].shape == (32, 9, 3, 3)
    assert not torch.equal(after["conv_in.weight"], before["conv_in.weight"])


def test_accumulated_micro_batches_see_the_masks_of_one_batch(trained, data, cache, tmp_path):
    main(flags(data, cache, tmp_path, train_batch_size=2, gradient_accumulation_steps=2, **INPAINT))
    assert_same_training(trained, tmp_path)


def test_two_processes_train_like_one_with_the_same_masks(trained, data, cache, tmp_path):
    log = launch(
        ["--multi_gpu", "--num_processes", "2"], flags(data, cache, tmp_path, train_batch_size=2, **INPAINT)
    )
    assert "global batch 4" in log
    assert_same_training(trained, tmp_path)


def test_an_interrupted_inpainting_run_resumes_to_the_same_weights(data, cache, tmp_path, monkeypatch):
    options = dict(max_steps=4, checkpoint_every=2, caption_dropout=0.25, random_flip="true", **INPAINT)
    main(flags(data, cache, tmp_path / "whole", **options))
    run_killed_at(monkeypatch, 3, lambda: main(flags(data, cache, tmp_path / "broken", **options)))
    main(flags(data, cache, tmp_path / "broken", resume="latest", **options))
    a, b = (
        weights(tmp_path / "whole" / "final", "unet_raw"),
        weights(tmp_path / "broken" / "final", "unet_raw"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "options, words",
    [
        (dict(cache_latents="true"), "inpainting with cache_latents: .* set cache_latents false"),
        (dict(release_encoders="true", lora="true", pretrained="x"), "inpainting with release_encoders"),
        (dict(lora="true", pretrained="x"), "inpainting with lora: .*lora false"),
        (dict(textual_inversion_token="<w>", pretrained="x"), "inpainting with textual_inversion_token"),
        (dict(distill="lcm", pretrained="x"), "inpainting with distill lcm"),
        (
            dict(class_data_dir="x", instance_data_dir="y", instance_prompt="a"),
            "inpainting with class_data_dir",
        ),
        (dict(validation_image="x.png", validation_prompts='["a"]'), "inpainting with validation_image"),
        (dict(inpaint_mask_kinds='["circle"]'), "inpaint_mask_kinds=.*rectangle, stroke"),
        (dict(inpaint_mask_sizes="[0.5, 0.2]"), "inpaint_mask_sizes=.*0 < LO <= HI <= 1"),
        (dict(inpaint_full_mask_rate=1.5), "inpaint_full_mask_rate=1.5"),
    ],
)
def test_what_inpainting_cannot_take_is_refused_in_one_line(data, tmp_path, options, words):
    settings = {"inpainting": "true", "cache_latents": "false", **options}
    args = [text for key, value in settings.items() for text in (f"--{key}", str(value))]
    with pytest.raises(ConfigError, match=words):
        parse_config(TrainConfig, ["--train_data_dir", str(data / "train"), "--output_dir", str(tmp_path),
                                   *args]).check()  # fmt: skip


def test_inpaint_keys_without_inpainting_are_refused(data, tmp_path):
    with pytest.raises(ConfigError, match="inpaint_mask_sizes set without inpainting"):
        parse_config(TrainConfig, ["--inpaint_mask_sizes", "[0.1, 0.2]"]).check()


def test_sdxl_trains_an_inpainting_u_net_that_inpaint_xl_pipeline_loads(data, cache, tmp_path):
    from diffusers import StableDiffusionXLInpaintPipeline

    from pipelines import InpaintXLPipeline

    validation = dict(
        val_data_dir=data / "test", validation_prompts='["a red circle"]', validation_inference_steps=2
    )
    final = main(flags(data, cache, tmp_path, preset="tiny-sdxl", max_steps=2, **validation, **INPAINT))
    assert (tmp_path / "validation" / "step-2.png").is_file()
    call = grey_square_call()
    ours = InpaintXLPipeline.from_pretrained(final)
    theirs = StableDiffusionXLInpaintPipeline.from_pretrained(
        final, local_files_only=True, add_watermarker=False
    )
    assert ours.unet.config.in_channels == 9
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    a = ours(**call, generator=torch.Generator().manual_seed(0)).images
    b = theirs(**call, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(a - b).max() <= 1e-4
