"""Fuzzed arguments: the pipeline and the sdlite CLI either work or fail with a message naming the
argument (ValueError, or argparse's exit 2), never with an exception from deep inside.

Seeded: the same draws every run. A draw sets each argument with probability 0.4 (0.25 for the
pipeline's many), to a value from its pool of good and bad ones; the rest keep their defaults. For
the pipeline each pool value is marked valid or not (with the rules that depend on other arguments
in ``in_context``): an invalid draw must be refused naming one of its invalid arguments, a valid one
must give finite images.
"""

import contextlib
import io
import math
import random

import pytest
import torch

from pipelines import inputs
from sdlite.models import build_components
from training.cli import main as cli

GOOD_GENERATOR = torch.Generator().manual_seed(0)
OK, BAD = True, False
# Each argument's pool: (value, valid). A valid value may still be refused in context (the `in_context`
# rules below: a list whose length must match the number of images, latents of the images' shape).
PIPELINE_POOLS = {
    "prompt": [("a red circle", OK), ("", OK), (["a", "b"], OK), ("word " * 100, OK), ([], BAD), (None, BAD),
               (3, BAD), (["a", 3], BAD), (b"x", BAD)],
    "num_inference_steps": [(1, OK), (2, OK), (0, BAD), (-1, BAD), (1.5, BAD), ("2", BAD), (None, BAD),
                            (True, BAD), (10**12, BAD)],
    "height": [(None, OK), (32, OK), (16, OK), (0, BAD), (-8, BAD), (33, BAD), (32.0, BAD), ("32", BAD),
               (10**6, BAD)],
    "width": [(None, OK), (24, OK), (7, BAD), (1.5, BAD)],
    "num_images_per_prompt": [(1, OK), (2, OK), (0, BAD), (-1, BAD), (1.5, BAD), ("1", BAD), (None, BAD),
                              (10**5, BAD)],
    "generator": [(None, OK), (GOOD_GENERATOR, OK), ([GOOD_GENERATOR], OK), ("seed", BAD), (0, BAD),
                  ([None], BAD)],
    "output_type": [("np", OK), ("pil", OK), ("pt", OK), ("latent", OK), ("jpg", BAD), (None, BAD), (1, BAD)],
    "negative_prompt": [(None, OK), ("", OK), ("blurry", OK), (["x"], OK), (5, BAD), ([1], BAD)],
    "latents": [(None, OK), (torch.zeros(1, 4, 8, 8), OK), (torch.full((1, 4, 8, 8), float("nan")), BAD),
                (torch.zeros(3), BAD), ("x", BAD)],
    "timesteps": [(None, OK), ([999, 500, 1], OK), ([], BAD), ([5000], BAD), (["a"], BAD), (3, BAD)],
    "sigmas": [(None, OK), ([1.0, 0.5], BAD), ([], BAD)],  # sdlite's DDPM takes no sigmas
    "ip_adapter_image_embeds": [(None, OK), ([torch.zeros(2, 1, 64)], BAD)],  # no IP-Adapter loaded
}  # fmt: skip
SAMPLING_POOLS = {
    "guidance_scale": [(1.0, OK), (7.5, OK), (0, OK), (-3, OK), (float("nan"), BAD), (float("inf"), BAD),
                       ("7", BAD), (None, BAD), (True, BAD), (1 + 0j, BAD)],
    "eta": [(0.0, OK), (1.0, OK), (-1, BAD), ("x", BAD), (float("nan"), BAD)],
    "guidance_rescale": [(0.0, OK), (0.7, OK), (-1, BAD), (2, BAD), ("x", BAD), (float("nan"), BAD)],
    "clip_skip": [(None, OK), (1, OK), (-1, BAD), (100, BAD), ("1", BAD), (1.5, BAD)],
}  # fmt: skip


def in_context(kwargs: dict, valid: dict) -> dict:
    """The validity of arguments that depends on others: list lengths and the latents' shape."""
    prompt = kwargs["prompt"]
    prompts = len(prompt) if valid["prompt"] and isinstance(prompt, list) else 1
    per = kwargs.get("num_images_per_prompt", 1) if valid.get("num_images_per_prompt", True) else 1
    images = prompts * per
    out = dict(valid)
    if isinstance(kwargs.get("generator"), list) and valid["generator"]:
        out["generator"] = len(kwargs["generator"]) == images
    if isinstance(kwargs.get("negative_prompt"), list) and valid["negative_prompt"]:
        out["negative_prompt"] = len(kwargs["negative_prompt"]) == prompts
    if isinstance(kwargs.get("latents"), torch.Tensor) and valid["latents"]:
        # tiny: 32 px by default, VAE factor 4 (an invalid size is refused first, by name)
        h, w = ((kwargs.get(k) if valid.get(k, True) else None) or 32 for k in ("height", "width"))
        shape = (images, 4, h // 4, w // 4)
        out["latents"] = tuple(kwargs["latents"].shape) == shape
    if "timesteps" in kwargs and kwargs["timesteps"] is not None:
        out.pop("num_inference_steps", None)  # ignored when timesteps are given
    if kwargs.get("timesteps") is not None and kwargs.get("sigmas") is not None:
        out["timesteps"] = False  # at most one of them
    return out


def fuzz_pipeline(pipe, pools: dict, trials: int, seed: int, p: float = 0.4) -> tuple[int, int]:
    """(valid draws, invalid draws). Every invalid draw must be refused with a ValueError naming one
    of its invalid arguments; every valid one must work and give finite images."""
    rng, counts = random.Random(seed), [0, 0]
    for _ in range(trials):
        drawn = {k: rng.choice(pool) for k, pool in pools.items() if rng.random() < p}
        kwargs = {"prompt": "a red circle", "num_inference_steps": 1} | {k: v for k, (v, _) in drawn.items()}
        valid = {"prompt": True} | {k: ok for k, (_, ok) in drawn.items()}
        bad = sorted(k for k, ok in in_context(kwargs, valid).items() if not ok)
        try:
            images = pipe(**kwargs, progress=False).images
        except ValueError as e:
            assert bad, f"valid arguments refused: {e} ({kwargs})"
            assert any(k in str(e) for k in bad), f"{e!r} names none of the invalid {bad}"
            counts[1] += 1
            continue
        assert not bad, f"invalid {bad} accepted: {kwargs}"
        if kwargs.get("output_type") in ("np", "pt", "latent"):
            assert torch.isfinite(torch.as_tensor(images)).all(), kwargs
        counts[0] += 1
    return counts[0], counts[1]


def test_fuzzed_pipeline_arguments_work_or_name_the_bad_one(pipe):
    good, bad = fuzz_pipeline(pipe, PIPELINE_POOLS, trials=300, seed=0, p=0.25)
    assert good > 30 and bad > 100  # the draws hit both sides


def test_fuzzed_sampling_options_work_or_name_the_bad_one(pipe):
    good, bad = fuzz_pipeline(pipe, SAMPLING_POOLS, trials=60, seed=1)
    assert good > 10 and bad > 10


@pytest.mark.parametrize(
    "check, kwargs, name",
    [
        (inputs.check_guidance, dict(guidance_scale=float("nan"), eta=0, guidance_rescale=0, clip_skip=None,
                                     text_layers=2), "guidance_scale"),
        (inputs.check_guidance, dict(guidance_scale=7, eta=-1, guidance_rescale=0, clip_skip=None,
                                     text_layers=2), "eta"),
        (inputs.check_guidance, dict(guidance_scale=7, eta=0, guidance_rescale=2, clip_skip=None,
                                     text_layers=2), "guidance_rescale"),
        (inputs.check_guidance, dict(guidance_scale=7, eta=0, guidance_rescale=0, clip_skip=3,
                                     text_layers=2), "clip_skip"),
        (inputs.check_noise, dict(generator=0, latents=None, num_images=1, latent_shape=(1, 4, 8, 8)),
         "generator"),
        (inputs.check_schedule, dict(num_inference_steps=1, timesteps=[], sigmas=None, limits=None),
         "timesteps"),
        (inputs.check_batch, dict(num_prompts=1, num_images_per_prompt=3, height=32, width=32, vae_factor=4,
                                  limits=inputs.Limits(max_images=2)), "num_images_per_prompt"),
    ],
)  # fmt: skip
def test_each_check_group_names_its_argument(check, kwargs, name):
    with pytest.raises(ValueError, match=name):
        check(**kwargs)


def run_cli(argv: list[str]) -> tuple[int, str]:
    """(exit status, stderr): main's return, or argparse's SystemExit."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return cli(argv), err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    build_components("tiny", seed=0).save_pretrained(path)
    return path


def draw_argv(rng: random.Random, model, tmp) -> list[str]:
    numbers = ["1", "2", "0", "-1", "x", "", "1.5", "nan", "1e400"]
    if rng.random() < 0.5:
        argv = ["generate", rng.choice(["a red circle", "", "word " * 100])]
        argv += ["--model", str(rng.choice([model, tmp / "missing", tmp]))] if rng.random() < 0.9 else []
        pools = {"--steps": ["1", "2", "0", "-1", "x"], "--seed": numbers, "--guidance": numbers + ["7.5"],
                 "--num_images": ["1", "3", "0", "-1"], "--upscale": ["1", "2", "0", "-1"],
                 "--out": [str(tmp / "o.png"), str(tmp / "sub" / "o.png")]}  # fmt: skip
        argv += ["--out", str(tmp / "default.png")]  # not the default, out.png in the working folder
        least = ["--steps", "1"]  # unless drawn: 50 steps would only take time
    else:
        argv = ["data", "shapes", "--out", str(tmp / rng.choice(["shapes", "more"]))]
        pools = {"--count": ["1", "3", "0", "-1", "x"], "--seed": numbers,
                 "--size": ["32", "8", "0", "-4", "x"], "--colours": ["red", "red,blue", "purple", ""],
                 "--shapes": ["circle", "hexagon", ""],
                 "--exclude": ["red circle", "nothing"], "--size_word_prob": ["0.5", "-1", "2", "nan"],
                 "--holdout": ["0", "1", "-1"]}  # fmt: skip
        least = ["--count", "2"]  # unless drawn: 2000 images would only take time
    for flag, pool in pools.items():
        if rng.random() < 0.4:
            argv += [flag, rng.choice(pool)]
    return argv + (least if least[0] not in argv else [])


def test_fuzzed_cli_arguments_work_or_fail_with_a_message(model, tmp_path):
    rng, outcomes = random.Random(0), {0: 0, 2: 0}
    for _ in range(40):
        argv = draw_argv(rng, model, tmp_path)
        status, err = run_cli(argv)
        assert status in (0, 2), (argv, status)
        assert status == 0 or err.strip(), argv  # a failure says why
        outcomes[status] += 1
    assert min(outcomes.values()) > 5 and math.isfinite(sum(outcomes.values()))


@pytest.mark.parametrize("flag", ["--stride", "--bpd_count", "--n", "--steps"])
def test_evaluate_refuses_counts_below_one(model, flag):
    argv = ["evaluate", "--model", str(model), "--n", "1", "--steps", "1", "--bpd_count", "2",
            "--shapes", "circle", "--colours", "red", flag, "0"]  # fmt: skip
    status, err = run_cli(argv)
    assert status == 2 and flag in err and "0 is not a whole number >= 1" in err
