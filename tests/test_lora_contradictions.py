"""Contradictions of the LoRA settings refused at start-up, naming the fix (TrainConfig.lora_contradictions):
LoRA settings on a run that trains no adapter, and an adapter on a model built from scratch."""

from pathlib import Path

import pytest

from training.config import ConfigError, parse_config
from training.config.unet import LORA_KEYS, TrainConfig
from training.train import main


@pytest.fixture
def nothing_built(monkeypatch):
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the settings were checked")

    monkeypatch.setattr("training.family.StableDiffusion.load", built)


def test_a_lora_setting_without_lora_is_refused_before_the_model(tmp_path, nothing_built):
    with pytest.raises(ConfigError) as refused:
        main(["--lora_rank", "8", "--lora_alpha", "4", "--output_dir", str(tmp_path / "run")])
    assert str(refused.value) == (
        "bad training config: lora_rank, lora_alpha set without lora: a run without it trains the weights "
        "themselves, not an adapter: add --lora true, or leave them out"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", [k for k in LORA_KEYS if k != "lora_from_scratch"])
def test_each_lora_setting_changed_without_lora_is_named(key):
    value = {"lora_target_modules": "[to_q]", "lora_text_encoder_target_modules": "[q_proj]",
             "lora_text_encoder": "true", "lora_save_format": "kohya", "text_encoder_lr": "1e-3",
             "lora_alpha": "2", "lora_dropout": "0.1", "lora_rank": "2", "lora_type": "loha",
             "lora_dora": "true", "lora_base_dtype": "bf16"}[key]  # fmt: skip
    problems = parse_config(TrainConfig, [f"--{key}", value]).problems()
    assert problems == [f"{key} set without lora: a run without it trains the weights themselves, not an "
                        "adapter: add --lora true, or leave them out"]  # fmt: skip


def test_a_lora_recipe_turned_off_names_its_lora_settings():
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "tiny-lora.yaml")
    problems = parse_config(TrainConfig, ["--config", recipe, "--lora", "false"]).problems()
    assert len(problems) == 1 and problems[0].startswith("lora_rank, lora_alpha")


def test_a_lora_on_a_model_built_from_scratch_is_refused_unless_asked_for(tmp_path, nothing_built):
    with pytest.raises(ConfigError, match=r"lora without pretrained: .* give --pretrained FOLDER"):
        main(["--lora", "true", "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ConfigError, match="lora without pretrained"):  # kohya's --network_dim turns LoRA on
        main(["--network_dim", "8", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    assert parse_config(TrainConfig, ["--lora", "true", "--lora_from_scratch", "true"]).problems() == []
    assert parse_config(TrainConfig, ["--lora", "true", "--pretrained", str(tmp_path)]).problems() == []
