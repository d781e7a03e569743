import json
import math
import os

import pytest
from PIL import Image

from pipelines.text_to_image import TextToImagePipeline
from sdlite.cli import main
from training import demo
from training.config import ConfigError, VAETrainConfig, load_yaml
from training.config.unet import TrainConfig


def test_the_whole_chain_runs_in_a_few_steps_and_makes_a_loadable_model(tmp_path, capsys):
    threads = os.environ.get("SDLITE_TEST_THREADS", "1")  # the tests' one thread (conftest.py)
    assert main(["demo", "--out", str(tmp_path), "--fast", "--threads", threads]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["stage_seconds"]) == ["data", "vae", "unet", "evaluate"]
    assert math.isfinite(results["bpd"]) and 0 <= results["fidelity"] <= 1
    assert math.isfinite(results["bpd_spread"]) and len(results["bound"]["draws"]) == 2
    assert results["fidelity_unseen"] is not None  # the demo leaves a pair out and asks for it
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "model")
    assert pipe.vae.config.scaling_factor == results["vae_scaling_factor"]
    assert Image.open(tmp_path / "samples.png").size[0] >= 32
    out = capsys.readouterr().out
    assert "prompt fidelity" in out and "bits/dim" in out and "total" in out
    # the VAE stage reads its round trip of the held-out images strictly, beside its PSNR
    assert 0 <= results["vae_round_trip"] <= 1 and results["vae_round_trip_images"] == 16
    assert "VAE round trip" in out and "round trip read back strictly" in out


def test_the_demo_builds_each_trainers_config_from_its_recipe_and_its_paths(tmp_path):
    cfg = demo.config(VAETrainConfig, "tiny-vae.yaml", output_dir=tmp_path / "vae", max_steps=4)
    recipe = load_yaml(demo.recipe("tiny-vae.yaml"))
    assert isinstance(cfg, VAETrainConfig)
    assert (
        cfg.run.output_dir == str(tmp_path / "vae") and cfg.optimizer.max_steps == 4
    )  # typed as the key says
    assert cfg.optimizer.learning_rate == recipe["learning_rate"] and cfg.model.preset == recipe["preset"]
    unet = demo.config(TrainConfig, "tiny-shapes.yaml", final_dir=tmp_path / "model")
    assert isinstance(unet, TrainConfig) and unet.run.final_dir == str(tmp_path / "model")
    with pytest.raises(ConfigError, match="max_step"):  # a misspelt key fails, naming it
        demo.config(TrainConfig, "tiny-shapes.yaml", max_step=4)
