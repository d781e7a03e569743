"""TextToImagePipeline generates what diffusers' StableDiffusionPipeline does, and checks its inputs."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMScheduler as DiffusersDDPM
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import is_xformers_available
from diffusers.utils.torch_utils import randn_tensor

from pipelines import TextToImagePipeline
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4


def seed(n=0):
    return torch.Generator().manual_seed(n)


@pytest.fixture(scope="module")
def parts():
    return build_components("tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(parts):
    pipe = TextToImagePipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, prompt=PROMPTS, **kw):
    kw = {"num_inference_steps": STEPS, "generator": seed(), "output_type": "np"} | kw
    return pipe(prompt, **kw).images


def scheduler_config(parts):
    # Underscored keys are dropped: from_config would reset the keys listed in _use_default_values to
    # their defaults. The preset's steps_offset is 1, the value diffusers' SD pipeline insists on.
    return {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}


def pair(parts, scheduler_class):
    """Our pipeline and diffusers', same weights, each with its own scheduler of one config."""
    models = {k: v for k, v in parts.as_dict().items() if k != "scheduler"}
    config = scheduler_config(parts)
    ours = TextToImagePipeline(**models, scheduler=scheduler_class.from_config(config))
    theirs = StableDiffusionPipeline(
        **models,
        scheduler=scheduler_class.from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    assert dict(theirs.scheduler.config) == dict(ours.scheduler.config)  # diffusers changed nothing
    for p in (ours, theirs):
        p.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("guidance_scale", [1.0, 6.0], ids=["unguided", "guided"])
@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DiffusersDDPM], ids=["sdlite-ddpm", "diffusers-ddpm"]
)
def test_images_equal_diffusers_stable_diffusion_pipeline(parts, scheduler_class, guidance_scale):
    ours, theirs = pair(parts, scheduler_class)
    a = run(ours, guidance_scale=guidance_scale)
    b = run(theirs, guidance_scale=guidance_scale)
    assert a.shape == b.shape == (2, 32, 32, 3)
    assert np.abs(a - b).max() <= 1e-4


def test_negative_prompt_and_guidance_rescale_match_diffusers(parts):
    ours, theirs = pair(parts, DDPMScheduler)
    kw = dict(negative_prompt=["blurry", "green"], guidance_scale=5.0, guidance_rescale=0.7)
    assert np.abs(run(ours, **kw) - run(theirs, **kw)).max() <= 1e-4
    assert np.abs(run(ours, **kw) - run(ours, guidance_scale=5.0)).max() > 1e-3


def test_euler_scheduler_swapped_in_matches_diffusers(parts):
    ours, theirs = pair(parts, DDPMScheduler)
    for p in (ours, theirs):
        p.scheduler = EulerDiscreteScheduler.from_config(p.scheduler.config)
    a, b = run(ours), run(theirs)  # Euler scales x_T by init_noise_sigma and the input per step
    assert np.abs(a - b).max() <= 1e-4
    assert np.isfinite(a).all()


def test_seeded_runs_repeat_exactly_and_seeds_differ(pipe):
    a, b, c = run(pipe), run(pipe), run(pipe, generator=seed(1))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_a_generator_per_image_makes_each_image_reproducible_alone(pipe):
    both = run(pipe, generator=[seed(5), seed(6)], guidance_scale=1.0)
    second = run(pipe, PROMPTS[1], generator=seed(6), guidance_scale=1.0)
    assert np.abs(both[1] - second[0]).max() <= 1e-4


def test_given_latents_are_the_starting_noise(pipe):
    g = seed(0)
    x_T = randn_tensor((2, 4, 8, 8), generator=g)  # what the pipeline draws first from seed 0
    assert np.array_equal(run(pipe, latents=x_T, generator=g), run(pipe))


def test_prompt_embeds_give_the_images_of_their_prompts(pipe):
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True, ["dull", "dark"])
    from_text = run(pipe, negative_prompt=["dull", "dark"])
    from_embeds = run(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    assert np.abs(from_text - from_embeds).max() <= 1e-5
    # Without negative_prompt_embeds, the empty prompt's are used, as with a text prompt.
    assert np.abs(run(pipe, None, prompt_embeds=embeds) - run(pipe)).max() <= 1e-5


def test_num_images_per_prompt_and_single_string_prompt(pipe):
    images = run(pipe, num_images_per_prompt=3)
    assert images.shape == (6, 32, 32, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-3  # different noise per copy
    assert run(pipe, "a red circle", height=48, width=64).shape == (1, 48, 64, 3)


def test_clip_skip_uses_an_earlier_layer(pipe):
    assert np.abs(run(pipe, clip_skip=1) - run(pipe)).max() > 1e-4


def test_output_types_have_their_shapes_and_ranges(pipe):
    kw = dict(guidance_scale=1.0)
    pil, np_, pt, latent = (run(pipe, output_type=t, **kw) for t in ("pil", "np", "pt", "latent"))
    assert isinstance(pil, list) and len(pil) == 2
    assert all(isinstance(im, PIL.Image.Image) and im.size == (32, 32) and im.mode == "RGB" for im in pil)
    assert np_.dtype == np.float32 and np_.shape == (2, 32, 32, 3) and 0 <= np_.min() <= np_.max() <= 1
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 32) and 0 <= pt.min() <= pt.max() <= 1
    assert isinstance(latent, torch.Tensor) and latent.shape == (2, 4, 8, 8)
    assert np.allclose(pt.permute(0, 2, 3, 1).numpy(), np_)
    assert np.array_equal(np.asarray(pil[0]), (np_[0] * 255).round().astype(np.uint8))
    pt.mul_(2)  # a normal tensor, not an inference-mode one: the caller may change it
    assert isinstance(pipe("a", num_inference_steps=1, return_dict=False)[0][0], PIL.Image.Image)


def test_callback_runs_once_per_step_and_can_replace_latents(pipe):
    seen = []

    def callback(p, step, t, tensors):
        seen.append((step, int(t), tuple(tensors["latents"].shape), tensors["prompt_embeds"].shape[0]))
        if step == STEPS - 1:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    out = run(pipe, callback_on_step_end=callback, output_type="latent",
              callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])  # fmt: skip
    assert [s[0] for s in seen] == list(range(STEPS))
    assert [s[1] for s in seen] == pipe.scheduler.timesteps.tolist()
    assert all(s[2] == (2, 4, 8, 8) and s[3] == 4 for s in seen)  # guided: [uncond; cond] embeddings
    assert torch.equal(out, torch.zeros(2, 4, 8, 8))


def test_progress_bar_shows_unless_disabled(parts, capsys):
    pipe = TextToImagePipeline(**parts.as_dict())
    run(pipe)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err  # tqdm's bar, on stderr
    run(pipe, progress=False)
    assert capsys.readouterr().err == ""
    pipe.set_progress_bar_config(disable=True)
    run(pipe)
    assert capsys.readouterr().err == ""


BAD_ARGUMENTS = [
    pytest.param(dict(prompt=3), "prompt must be a str or a non-empty list of str", id="prompt type"),
    pytest.param(dict(prompt=["a", 1]), "prompt must be a str", id="prompt list of non-str"),
    pytest.param(dict(prompt=[]), "prompt must be a str or a non-empty list", id="prompt empty list"),
    pytest.param(
        dict(prompt_embeds=torch.zeros(2, 16, 64)),
        "exactly one of prompt or prompt_embeds",
        id="prompt and prompt_embeds",
    ),
    pytest.param(
        dict(prompt=None),
        "exactly one of prompt or prompt_embeds, got neither",
        id="neither prompt nor embeds",
    ),
    pytest.param(
        dict(prompt=None, prompt_embeds=torch.zeros(2, 64)),
        r"prompt_embeds must .*\(batch, tokens, 64\)",
        id="prompt_embeds shape",
    ),
    pytest.param(
        dict(prompt=None, prompt_embeds=torch.zeros(2, 16, 32)),
        "prompt_embeds must",
        id="prompt_embeds width",
    ),
    pytest.param(
        dict(negative_prompt=["x"]),
        "negative_prompt has 1 entries but there are 2 prompts",
        id="negative_prompt length",
    ),
    pytest.param(
        dict(negative_prompt=5), "negative_prompt must be a str or a list of str", id="negative_prompt type"
    ),
    pytest.param(
        dict(negative_prompt="x", negative_prompt_embeds=torch.zeros(2, 16, 64)),
        "at most one of negative_prompt",
        id="negative both",
    ),
    pytest.param(
        dict(negative_prompt_embeds=torch.zeros(1, 16, 64)),
        r"negative_prompt_embeds must have shape \(2, 16, 64\)",
        id="negative_prompt_embeds shape",
    ),
    pytest.param(dict(height=30), "height must be a positive multiple of 4", id="height multiple"),
    pytest.param(dict(width=33), "width must be a positive multiple of 4", id="width multiple"),
    pytest.param(dict(height=-8), "height must be a positive multiple", id="height negative"),
    pytest.param(dict(num_inference_steps=0), "num_inference_steps must be an int >= 1", id="steps < 1"),
    pytest.param(dict(num_inference_steps=2.5), "num_inference_steps must be an int >= 1", id="steps type"),
    pytest.param(
        dict(num_images_per_prompt=0), "num_images_per_prompt must be an int >= 1", id="images per prompt < 1"
    ),
    pytest.param(
        dict(output_type="jpeg"),
        r"output_type must be one of \('pil', 'np', 'pt', 'latent'\)",
        id="output_type",
    ),
    pytest.param(
        dict(generator=[seed()]), "generator is a list of 1 but 2 images", id="generator list length"
    ),
    pytest.param(
        dict(latents=torch.zeros(1, 4, 8, 8)), r"latents must have shape \(2, 4, 8, 8\)", id="latents shape"
    ),
    pytest.param(
        dict(callback_on_step_end_tensor_inputs=["noise"]),
        "callback_on_step_end_tensor_inputs may name",
        id="callback inputs",
    ),
]


@pytest.mark.parametrize("kwargs, message", BAD_ARGUMENTS)
def test_bad_argument_raises_value_error_naming_it(pipe, kwargs, message):
    kwargs = {"prompt": PROMPTS, "num_inference_steps": 1} | kwargs
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)


def test_attention_is_pytorch_sdpa_by_default(pipe):
    for model in (pipe.unet, pipe.vae):
        kinds = {type(p) for p in model.attn_processors.values()}
        assert kinds == {AttnProcessor2_0}


@pytest.mark.skipif(is_xformers_available(), reason="xformers is installed here")
def test_xformers_missing_names_the_extra_to_install(pipe):
    with pytest.raises(ImportError, match=r"pip install sdlite\[xformers\]"):
        pipe.enable_xformers_memory_efficient_attention()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_model_cpu_offload_without_gpu_says_why(pipe):
    with pytest.raises(RuntimeError, match="no GPU"):
        pipe.enable_model_cpu_offload()


def test_attention_slicing_gives_close_images(pipe):
    reference = run(pipe)
    pipe.enable_attention_slicing()
    try:
        sliced = run(pipe)
    finally:
        pipe.disable_attention_slicing()
    assert np.abs(sliced - reference).max() <= 1e-4
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}


def test_vae_slicing_and_tiling_give_close_images(pipe):
    latents = run(pipe, output_type="latent", height=64, width=64)
    reference = pipe.decode_latents(latents, "np")
    pipe.enable_vae_slicing()
    try:
        sliced = pipe.decode_latents(latents, "np")
    finally:
        pipe.disable_vae_slicing()
    assert np.abs(sliced - reference).max() <= 1e-5
    pipe.enable_vae_tiling()  # the tiny VAE's tiles are 32 px: a 64 px image is 4 tiles, blended
    try:
        tiled = pipe.decode_latents(latents, "np")
    finally:
        pipe.disable_vae_tiling()
    assert tiled.shape == reference.shape
    assert np.abs(tiled - reference).mean() <= 0.05
