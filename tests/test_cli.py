import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from pipelines.text_to_image import TextToImagePipeline
from sdlite import cli
from sdlite.cli import main
from sdlite.data.shapes import write_dataset
from sdlite.fidelity import GENERATOR_DATA
from sdlite.lora import LoraSettings, adapter_parameters, add_lora, save_lora
from sdlite.models import build_components, load_components, save_components
from sdlite.presets import get_preset
from training.schedulers import SCHEDULERS, make_scheduler


@pytest.fixture(autouse=True)
def _threads(monkeypatch):
    """The commands' default threads follow $OMP_NUM_THREADS: the tests' one thread (conftest.py)."""
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("SDLITE_TEST_THREADS", "1"))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random-weight tiny model folder: enough to run every command quickly."""
    return save_components(build_components("tiny", seed=0), tmp_path_factory.mktemp("model"))


def generate(model, out, *flags: str) -> bytes:
    """The pixels `sdlite generate "a red circle" --steps 2 <flags>` writes (it must succeed)."""
    argv = ["generate", "a red circle", "--model", str(model), "--steps", "2", "--seed", "0"]
    assert main(argv + ["--out", str(out), *flags]) == 0
    return Image.open(out).tobytes()


def usage_error(argv: list[str], capsys) -> str:
    """stderr of an argument error (argparse's exit 2)."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


# ---- the parser: fast, no torch, no shortened flags ----------------------------------------------

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets")
PARSE_ONLY = """
import sys
from sdlite.cli import main
for argv in {argvs!r}:
    try:
        main(argv)
    except SystemExit:
        pass
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({heavy!r})))
"""


def test_help_and_argument_errors_import_no_torch_or_diffusers():
    argvs = [["--help"], ["generate", "--help"], ["evaluate", "--help"], ["demo", "--help"]]
    argvs += [["data", "shapes", "--help"], ["generate", "x", "--model", "m", "--num_image", "4"]]
    argvs += [["generate", "x", "--model", "m", "--lora", "nowhere"], ["nonsense"]]
    code = PARSE_ONLY.format(argvs=argvs, heavy=HEAVY)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage: sdlite" in done.stdout and "no such file or folder" in done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"  # none of HEAVY was imported


def test_shortened_flags_are_refused(model, capsys):
    err = usage_error(["generate", "x", "--model", str(model), "--num_image", "4"], capsys)
    assert "unrecognized arguments: --num_image" in err
    err = usage_error(["evaluate", "--model", str(model), "--bpd", "4"], capsys)
    assert "unrecognized arguments: --bpd" in err
    err = usage_error(["data", "shapes", "--out", "x", "--cou", "4"], capsys)
    assert "unrecognized arguments: --cou" in err


def test_timesteps_out_of_order_or_not_numbers_are_refused_by_the_parser(model, capsys):
    for command in (["generate", "x"], ["evaluate"]):
        err = usage_error([*command, "--model", str(model), "--timesteps", "279,599"], capsys)
        assert "'279,599': timesteps must be >= 0 and go from high to low" in err
    err = usage_error(["generate", "x", "--model", str(model), "--timesteps", "599;279"], capsys)
    assert "'599;279': give timesteps high to low: 599,439,279,119" in err


def test_a_missing_lora_path_is_named_as_a_missing_file(model, tmp_path, capsys):
    missing = tmp_path / "runs" / "no-lora"
    err = usage_error(["generate", "x", "--model", str(model), "--lora", f"{missing}:0.5"], capsys)
    assert f"no such file or folder: {str(missing)!r}" in err
    assert "Repo id" not in err and "Traceback" not in err


def test_a_lora_that_cannot_be_read_fails_with_a_message(model, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "lora.bin").write_bytes(b"a pickle, perhaps")
    (tmp_path / "cut.safetensors").write_bytes(b"\x08")
    argv = ["generate", "x", "--model", str(model), "--steps", "1", "--out", str(tmp_path / "x.png")]
    expected = {
        "empty": "pytorch_lora_weights.safetensors",
        "lora.bin": "pickled",
        "cut.safetensors": "header",
    }
    for name, words in expected.items():
        assert main(argv + ["--lora", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"--lora {str(tmp_path / name)!r}" in err and words in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_lora_spec_reads_a_scale_after_the_last_colon(tmp_path):
    (tmp_path / "a:b").mkdir()
    assert cli.lora_spec(str(tmp_path / "a:b")) == (str(tmp_path / "a:b"), None)  # generate's --scale
    assert cli.lora_spec(f"{tmp_path / 'a:b'}:0.25") == (str(tmp_path / "a:b"), 0.25)
    assert cli.lora_spec(f"{tmp_path}:-1") == (str(tmp_path), -1.0)


def test_default_threads_follow_the_machine(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(cli, "_threads_per_core", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    assert cli.default_threads() == 6
    monkeypatch.setattr(cli, "_threads_per_core", lambda: 2)  # hyper-threads share a core: half
    assert cli.default_threads() == 3
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cli.default_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user's standing choice wins
    assert cli.default_threads() == 5


def test_a_command_runs_on_the_default_threads_and_restores_them(model, tmp_path, monkeypatch):
    from training import cmd_generate

    seen = []
    monkeypatch.setattr(cmd_generate, "run", lambda args: seen.append(torch.get_num_threads()) or 0)
    monkeypatch.setattr(cli, "default_threads", lambda: 3)
    before = torch.get_num_threads()
    assert main(["generate", "x", "--model", str(model)]) == 0
    assert main(["generate", "x", "--model", str(model), "--threads", "2"]) == 0
    assert seen == [3, 2] and torch.get_num_threads() == before


# ---- generate ------------------------------------------------------------------------------------


def test_generate_writes_a_grid_png_of_the_right_size(model, tmp_path):
    generate(model, tmp_path / "four.png", "--num_images", "4")
    assert Image.open(tmp_path / "four.png").size == (4 * 32, 32)
    generate(model, tmp_path / "one.png", "--upscale", "2")
    assert Image.open(tmp_path / "one.png").size == (64, 64)
    generate(model, tmp_path / "tall.png", "--height", "64", "--width", "32")
    assert Image.open(tmp_path / "tall.png").size == (32, 64)


def test_generate_rejects_a_size_the_model_cannot_make(model, tmp_path, capsys):
    argv = ["generate", "x", "--model", str(model), "--steps", "1", "--height", "30"]
    assert main(argv + ["--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "height" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


def test_generate_steers_away_from_a_negative_prompt(model, tmp_path):
    plain = generate(model, tmp_path / "plain.png")
    assert generate(model, tmp_path / "same.png", "--negative_prompt", "") == plain  # "" is no prompt
    assert generate(model, tmp_path / "neg.png", "--negative_prompt", "a blue square") != plain


def test_every_scheduler_name_makes_its_class_on_the_models_schedule(model):
    config = load_components(model).scheduler.config
    for name, entry in SCHEDULERS.items():
        if entry is None:
            assert make_scheduler(name, config) is None  # ddpm: the model's own
            continue
        try:
            scheduler = make_scheduler(name, config)
        except ValueError as e:  # a class whose optional package is missing here (lms: scipy)
            assert f"--scheduler {name}" in str(e) and "pip install" in str(e)
            continue
        assert type(scheduler).__name__ == entry[0]
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type"):
            assert scheduler.config[key] == config[key], (name, key)
        for key, value in entry[1].items():
            assert scheduler.config[key] == value


def test_generate_samples_with_the_chosen_scheduler(model, tmp_path, capsys):
    ddpm = generate(model, tmp_path / "ddpm.png")
    # Not euler_a: Euler ancestral is DDPM's ancestral sampler (σ_t² = β̃_t) in k-diffusion's notation,
    # so on the same timesteps and noise draws it gives DDPM's pixels.
    for name in ("ddim", "euler", "dpm++_sde"):
        assert generate(model, tmp_path / f"{name}.png", "--scheduler", name) != ddpm, name
    err = usage_error(["generate", "x", "--model", str(model), "--scheduler", "dpm"], capsys)
    assert "invalid choice: 'dpm'" in err


def test_generate_reads_a_single_file_checkpoint(model, tmp_path, capsys):
    checkpoint = TextToImagePipeline.from_pretrained(model).save_single_file(tmp_path / "tiny.safetensors")
    from_folder = generate(model, tmp_path / "folder.png")
    assert generate(checkpoint, tmp_path / "file.png", "--model_config", "tiny") == from_folder
    assert generate(checkpoint, tmp_path / "file2.png", "--model_config", str(model)) == from_folder
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    assert main(["generate", "x", "--model", str(pickle), "--model_config", "tiny"]) == 2
    assert "pickled checkpoints" in capsys.readouterr().err


def random_lora(model, folder, seed: int):
    """An sdlite LoRA of the tiny model's U-Net and text encoder whose update is visible (B starts at
    zero, a no-op)."""
    parts = load_components(model)
    add_lora(parts.unet, parts.text_encoder, LoraSettings(rank=4, text_encoder=True))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in [*adapter_parameters(parts.unet), *adapter_parameters(parts.text_encoder)]:
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    save_lora(folder, parts.unet, parts.text_encoder)
    with safe_open(folder / "pytorch_lora_weights.safetensors", "pt") as f:
        assert any(k.startswith("text_encoder.") for k in f.keys())
    return folder


def test_generate_applies_several_loras_each_at_its_scale(model, tmp_path):
    a = random_lora(model, tmp_path / "a", seed=1)
    b_file = random_lora(model, tmp_path / "b", seed=2) / "pytorch_lora_weights.safetensors"
    base = generate(model, tmp_path / "base.png")
    assert generate(model, tmp_path / "a0.png", "--lora", f"{a}:0") == base
    only_a = generate(model, tmp_path / "a1.png", "--lora", str(a))  # scale 1 when none is given
    assert only_a != base
    assert generate(model, tmp_path / "a1b0.png", "--lora", f"{a}:1", "--lora", f"{b_file}:0") == only_a
    both = generate(model, tmp_path / "a1b1.png", "--lora", f"{a}:1", "--lora", f"{b_file}:1")
    assert both not in (base, only_a)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """(model folder, LoRA file) of the shipped recipe's shape."""
    folder = tmp_path_factory.mktemp("recipe")
    model = recipe_model(folder / "model")
    return model, unet_lora(model, folder / "lora", seed=1)


def recipe_model(folder):
    """A model folder of the shape configs/tiny-shapes.yaml (the demo's recipe) trains, read from that
    file: its U-Net's layers_per_block is a list, one count per level."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny-shapes.yaml").read_text())
    preset = get_preset(recipe["preset"]).with_text_encoder_layers(recipe["text_encoder_layers"])
    preset = preset.with_unet_channels(recipe["unet_block_out_channels"])
    preset = preset if recipe["unet_mid_block"] else preset.without_unet_mid_block()
    parts = build_components(preset.with_unet_layers(recipe["unet_layers_per_block"]), seed=0)
    assert isinstance(parts.unet.config.layers_per_block, list)
    return save_components(parts, folder)


def unet_lora(model, folder, seed: int) -> Path:
    """The .safetensors file of a random U-Net-only LoRA of ``model`` (as configs/tiny-lora.yaml trains)."""
    parts = load_components(model)
    add_lora(parts.unet, None, LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(parts.unet):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return save_lora(folder, parts.unet)


def test_generate_scales_a_lora_on_a_model_of_the_shipped_recipe(recipe, tmp_path):
    model, lora = recipe
    base = generate(model, tmp_path / "base.png")
    assert generate(model, tmp_path / "s0.png", "--lora", f"{lora}:0") == base
    full = generate(model, tmp_path / "s1.png", "--lora", f"{lora}:1")
    assert full != base and generate(model, tmp_path / "plain.png", "--lora", str(lora)) == full
    assert generate(model, tmp_path / "s08.png", "--lora", f"{lora}:0.8") not in (base, full)


def test_generate_takes_diffusers_argument_names_and_the_earlier_ones_alike(model):
    names = ["--num_inference_steps", "3", "--guidance_scale", "2.5", "--negative_prompt", "blue"]
    names += ["--width", "64", "--height", "32", "--seed", "7"]
    earlier = ["--steps", "3", "--guidance", "2.5", "--negative_prompt", "blue"]
    earlier += ["--width", "64", "--height", "32", "--seed", "7"]
    parsed = [
        vars(cli.build_parser().parse_args(["generate", "x", "--model", "m", *a])) for a in (names, earlier)
    ]
    assert {k: v for k, v in parsed[0].items() if k != "check"} == {
        k: v for k, v in parsed[1].items() if k != "check"
    }
    assert parsed[0]["num_inference_steps"] == 3 and parsed[0]["guidance_scale"] == 2.5


def test_scale_is_the_lora_scale_of_loras_given_without_one(recipe, tmp_path):
    model, lora = recipe
    base = generate(model, tmp_path / "base.png")
    full = generate(model, tmp_path / "full.png", "--lora", f"{lora}:1")
    assert generate(model, tmp_path / "s0.png", "--lora", str(lora), "--scale", "0") == base
    assert generate(model, tmp_path / "own.png", "--lora", f"{lora}:1", "--scale", "0") == full
    assert generate(model, tmp_path / "s08.png", "--lora", str(lora), "--scale", "0.8") == generate(
        model, tmp_path / "08.png", "--lora", f"{lora}:0.8"
    )


def test_scale_without_a_lora_is_refused_naming_lora_and_upscale(model, capsys):
    err = usage_error(["generate", "x", "--model", str(model), "--scale", "2"], capsys)
    assert "--lora FILE:SCALE" in err and "--upscale" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


# ---- data and evaluate ---------------------------------------------------------------------------


def test_data_shapes_writes_an_image_folder(tmp_path):
    argv = ["data", "shapes", "--out", str(tmp_path), "--count", "12", "--exclude", "red circle"]
    assert main(argv + ["--colours", "red,blue", "--holdout", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert all(Image.open(tmp_path / "train" / r["file_name"]).size == (32, 32) for r in rows)
    assert all(("red" in r["text"] or "blue" in r["text"]) and "red circle" not in r["text"] for r in rows)


def test_evaluate_rejects_a_model_folder_missing_a_part(model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shutil.rmtree(broken / "unet")
    assert main(["evaluate", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "has no unet" in err and "Traceback" not in err
    assert main(["evaluate", "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_reports_fidelity_diversity_and_bits_per_dim(model, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["evaluate", "--model", str(model), "--n", "2", "--steps", "2", "--colours", "red,blue"]
    argv += ["--shapes", "circle", "--bpd_count", "4", "--stride", "250", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["per_prompt"]) == {"a red circle", "a blue circle"}
    assert 0 <= results["fidelity"] <= 1 and results["diversity"] >= 0
    assert set(results["diversity_by_axis"]) == {"x", "y", "size"}
    assert math.isclose(sum(results["diversity_by_axis"].values()) / 3, results["diversity"], abs_tol=1e-9)
    assert math.isfinite(results["bpd"]) and results["bpd"] > 0
    # the default three draws of the bound's sampled terms: their mean, and their standard error
    assert len(results["bound"]["draws"]) == 3 and results["bpd_spread"] > 0
    printed = capsys.readouterr().out
    assert "bits/dim" in printed and "± " in printed and "diversity by axis: x " in printed
    assert results["diversity_reference"] == GENERATOR_DATA  # no --data: the generator's spreads


def test_evaluate_measures_diversity_against_the_data_it_is_given(model, tmp_path):
    """With --data the diversity divides by the spread of that data's own images (all of them, not
    only the bits/dim ones): a held-out set whose captions name sizes more often is narrower."""
    data = write_dataset(tmp_path / "data", count=96, seed=3, size_word_prob=0.8)
    out = tmp_path / "results.json"
    argv = [
        "evaluate",
        "--model",
        str(model),
        "--n",
        "2",
        "--steps",
        "2",
        "--colours",
        "red",
        "--shapes",
        "circle",
    ]
    argv += ["--bpd_count", "4", "--stride", "250", "--data", str(data), "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["diversity_reference"].startswith("96 data images (no size word ")
    assert math.isfinite(results["bpd"])
