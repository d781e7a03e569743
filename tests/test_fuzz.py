"""Fuzzed arguments: the pipeline and the sdlite CLI either work or fail with a message naming the
argument (ValueError, or argparse's exit 2), never with an exception from deep inside.

Seeded: the same draws every run. A draw sets each argument with probability 0.4, to a value from its
pool of good and bad ones; the rest keep their defaults.
"""

import contextlib
import io
import math
import random

import pytest
import torch

from sdlite.models import build_components
from sdlite.pipelines import TextToImagePipeline
from sdlite.pipelines.inputs import check_text_to_image_inputs
from sdlite.training.cli import main as cli

GOOD_GENERATOR = torch.Generator().manual_seed(0)
PIPELINE_POOLS = {
    "prompt": ["a red circle", "", ["a", "b"], [], None, 3, ["a", 3], b"x", "word " * 100],
    "num_inference_steps": [1, 2, 0, -1, 1.5, "2", None, True, 10**12],
    "height": [None, 32, 16, 0, -8, 33, 32.0, "32"],
    "width": [None, 24, 7, 1.5],
    "num_images_per_prompt": [1, 2, 0, -1, 1.5, "1", None],
    "generator": [None, GOOD_GENERATOR, "seed", 0, [GOOD_GENERATOR], [None]],
    "output_type": ["np", "pil", "pt", "latent", "jpg", None, 1],
    "negative_prompt": [None, "", "blurry", ["x"], 5, [1]],
    "latents": [None, torch.zeros(1, 4, 8, 8), torch.zeros(3), "x"],
    "timesteps": [None, [999, 500, 1], [], [5000], ["a"], 3],
}
# Checked by pipelines/inputs.py once TextToImagePipeline.check_inputs passes them on.
SAMPLING_POOLS = {
    "guidance_scale": [1.0, 7.5, 0, -3, float("nan"), float("inf"), "7", None, True, 1 + 0j],
    "eta": [0.0, 1.0, -1, "x", float("nan")],
    "guidance_rescale": [0.0, 0.7, -1, 2, "x", float("nan")],
    "clip_skip": [None, 1, -1, 100, "1", 1.5],
}


@pytest.fixture(scope="module")
def pipe():
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fuzz_pipeline(pipe, pools: dict, trials: int, seed: int) -> int:
    rng, failures = random.Random(seed), 0
    for _ in range(trials):
        kwargs = {k: rng.choice(pool) for k, pool in pools.items() if rng.random() < 0.4}
        kwargs = {"prompt": "a red circle", "num_inference_steps": 1, **kwargs}
        try:
            images = pipe(**kwargs, progress=False).images
        except ValueError as e:
            named = [k for k in kwargs if k in str(e)]
            assert named, f"{e} names none of {sorted(kwargs)}"
            failures += 1
            continue
        if kwargs.get("output_type") in ("np", "pt"):
            assert torch.isfinite(torch.as_tensor(images)).all(), kwargs
    return failures


def test_fuzzed_pipeline_arguments_work_or_name_the_bad_one(pipe):
    failures = fuzz_pipeline(pipe, PIPELINE_POOLS, trials=300, seed=0)
    assert 50 < failures < 300  # the draws hit both sides


def test_fuzzed_sampling_options_work_or_name_the_bad_one(pipe):
    fuzz_pipeline(pipe, SAMPLING_POOLS, trials=60, seed=1)


def test_sampling_options_checks_name_the_argument():
    common = dict(prompt="x", height=32, width=32, vae_factor=4, latent_channels=4, embed_width=64)
    for kwargs in ({"guidance_scale": float("nan")}, {"guidance_scale": "7"}, {"eta": -1},
                   {"guidance_rescale": 2}, {"clip_skip": 3, "text_layers": 2}, {"clip_skip": 1.5},
                   {"generator": 0}, {"timesteps": []}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            check_text_to_image_inputs(**common, **kwargs)
    assert check_text_to_image_inputs(**common, guidance_scale=7.5, eta=0.0, clip_skip=1, text_layers=2) == 1


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
                 "--num_images": ["1", "3", "0", "-1"], "--scale": ["1", "2", "0", "-1"],
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
