"""``sdlite train`` / ``sdlite train-vae`` (training/cmd_train.py): the trainers under accelerate from any
folder, the shipped recipes by name (training/named_recipes.py), bad flags answered before torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sdlite.data.shapes import write_dataset
from sdlite.models import build_components
from training import cli, cmd_train, named_recipes

try:
    import tomllib
except ImportError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SDLITE = Path(sys.executable).parent / "sdlite"


def test_the_lora_recipe_runs_by_name_from_the_folder_of_make_demo(tmp_path):
    """What `make demo` leaves (runs/demo/model) and the recipe's one data command, then
    `sdlite train --config tiny-lora` in that folder, diffusers' flags over it."""
    build_components("tiny", seed=0).save_pretrained(tmp_path / "runs" / "demo" / "model")
    write_dataset(
        tmp_path / "data" / "red-circle", count=8, seed=0, colours=["red"], shapes=["circle"], holdout=4
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    flags = ["--max_train_steps", "2", "--train_batch_size", "4", "--validation_inference_steps", "2",
             "--validation_prompt", "a red circle, small", "--cache_dir", str(tmp_path / "cache"),
             "--report_to", "none"]  # fmt: skip
    result = subprocess.run([str(SDLITE), "train", "--config", "tiny-lora", *flags], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "tiny-lora"
    assert (run / "final" / "pytorch_lora_weights.safetensors").is_file()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["pretrained"], saved["max_steps"], saved["lora"]) == ("runs/demo/model", 2, True)
    assert saved["validation_prompts"] == ["a red circle, small"]
    assert (
        result.stderr.count("diffusers/kohya flags read as sdlite's: --max_train_steps -> --max_steps") == 1
    )


def test_a_missing_recipe_path_names_what_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as missing:
        cmd_train.prepare("train", ["--config", "tiny-lora"])
    lines = str(missing.value).splitlines()
    assert lines[0].startswith("recipe tiny-lora: pretrained 'runs/demo/model' is not in")
    assert "make it with: make demo" in lines[0] and "or give --pretrained PATH" in lines[0]
    assert "sdlite data shapes --out data/red-circle --colours red --shapes circle" in lines[1]
    build_components("tiny", seed=0).save_pretrained(tmp_path / "elsewhere")
    with pytest.raises(ValueError) as missing:  # a flag replaces the recipe's path: not asked for again
        cmd_train.prepare("train", ["--config", "tiny-lora", "--pretrained", "elsewhere"])
    assert "pretrained" not in str(missing.value) and "train_data_dir" in str(missing.value)


def test_bad_flags_are_answered_at_once_before_torch_is_imported():
    code = (
        "import sys, time; from training import cli; start = time.process_time()\n"
        "try:\n    cli.main(['train', '--max_train_stepz', '1', '--dataset_name', 'x', '--rank', '4'])\n"
        "except SystemExit as e:\n    print(e.code, 'torch' in sys.modules, time.process_time() - start)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    status, torch_imported, seconds = result.stdout.split()
    assert (status, torch_imported) == ("2", "False") and float(seconds) < 0.5, result.stderr
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(
        "sdlite train: error: --max_train_stepz is not a setting"
    )
    assert "--dataset_name: give --train_data_dir" in errors[0]


def test_launcher_flags_become_accelerate_options():
    options, rest = cmd_train.take_launcher_flags(
        ["--num_processes", "2", "--max_steps=3", "--main_process_port=1"]
    )
    assert options == {"num_processes": "2", "main_process_port": "1"} and rest == ["--max_steps=3"]
    assert cmd_train.accelerate_flags(options) == [
        "--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2", "--multi_gpu",
        "--main_process_port", "1",
    ]  # fmt: skip
    ddp = str(ROOT / "configs" / "accelerate" / "ddp.yaml")
    assert cmd_train.accelerate_flags({"accelerate_config": ddp}) == ["--config_file", ddp]
    for bad in ({"num_processes": "0"}, {"accelerate_config": "nowhere.yaml"}):
        with pytest.raises(ValueError):
            cmd_train.accelerate_flags(bad)


def test_without_the_repositorys_accelerate_config_its_settings_are_flags(monkeypatch, tmp_path):
    monkeypatch.setattr(cmd_train, "DEFAULT_ACCELERATE", tmp_path / "none.yaml")  # an installed wheel
    assert cmd_train.accelerate_flags({}) == cmd_train.ONE_PROCESS
    assert cmd_train.accelerate_flags({"num_processes": "2"})[-3:] == ["--num_processes", "2", "--multi_gpu"]


def test_train_vae_reads_its_own_settings_and_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "data" / "shapes", count=4, seed=0, holdout=2)
    launch, ours = cmd_train.prepare("train-vae", ["--config", "tiny-vae", "--max_train_steps", "5"])
    assert data.is_dir()  # the recipe reads data/shapes here
    assert f"--config={named_recipes.find('tiny-vae')}" in ours
    assert "--max_steps=5" in ours and launch[0] == "--config_file"
    assert (ROOT / "training" / cmd_train.SCRIPTS["train-vae"]).is_file()


def test_a_recipe_name_finds_the_shipped_file_and_a_file_of_that_name_here_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert named_recipes.find("tiny-lora") == named_recipes.find("tiny-lora.yaml")
    assert named_recipes.find("tiny-lora").read_bytes() == (ROOT / "configs" / "tiny-lora.yaml").read_bytes()
    (tmp_path / "tiny-lora.yaml").write_text("max_steps: 1\n")
    assert named_recipes.find("tiny-lora.yaml") is None and named_recipes.find("nothing") is None
    assert {"tiny-lora", "tiny-shapes", "tiny-vae", "sd15-lora"} <= set(named_recipes.names())


def test_the_recipes_ship_as_the_training_packages_data():
    """training/recipes is configs/, and pyproject's package data for training takes every recipe."""
    assert (ROOT / "training" / "recipes").resolve() == (ROOT / "configs").resolve()
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p.resolve() for pattern in patterns["training"] for p in (ROOT / "training").glob(pattern)}
    assert shipped == {p.resolve() for p in (ROOT / "configs").rglob("*.yaml")}


def test_help_lists_the_launcher_options_the_recipes_and_the_settings(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["sdlite"])
    with pytest.raises(SystemExit):
        cmd_train.main("train", ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--num_processes N" in text and "tiny-lora" in text and "--max_steps MAX_STEPS" in text
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "train-vae" in capsys.readouterr().out


def test_a_config_file_of_yours_has_its_missing_paths_named_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text("pretrained: models/base\nval_data_dir: none\n")
    with pytest.raises(ValueError) as missing:
        cmd_train.prepare("train", ["--config=mine.yaml", "--train_data_dir", "."])
    assert str(missing.value) == (
        f"recipe mine: pretrained 'models/base' is not in {str(Path.cwd())!r} (paths are relative to the "
        "folder you run in): or give --pretrained PATH"
    )
