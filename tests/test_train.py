"""training/train.py end to end on the tiny preset: launched, multi-process, resumed, options.

How close is "the same training"? Runs that split one global batch differently (2 processes x 2,
1 x 4, 1 x 2 with 2 accumulation steps) compute the same gradients up to float32 summation order
(~1e-7 relative). Adam's step, lr * m / (sqrt(v) + eps), does not depend on the gradient's scale, so
such an error moves a weight by ~lr * 1e-7, except where a gradient is ~0 and noise flips its sign:
that weight can move by up to 2 lr. Measured (lr 1e-3, 3 steps, 4.1 M weights): median difference
1e-8, 99.9th percentile 5e-7, 48 weights above 1e-5, the largest 1.1e-4. A real difference (another
batch, other noise, another learning rate, a missing all-reduce) moves nearly every weight by ~lr.
So `assert_same_training` asks for a mean difference under 1e-6 and fewer than 0.1% of weights
more than 1e-5 apart.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sdlite.models import build_components, load_components
from training.config import ConfigError, VAETrainConfig, field_docs, get, keys, parse_config
from training.config import lora as lora_config
from training.config.unet import TrainConfig
from training.train import UNetTrainer, main
from training.unet_step import min_snr_weight

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def trainers_kept():
    """Yields a list that each UNetTrainer reaching save_final inside the block is appended to (its adapted
    models intact for the test to read); save_final still runs and writes the run's files."""
    runs, save_final = [], UNetTrainer.save_final

    def keep(trainer):
        runs.append(trainer)
        return save_final(trainer)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNetTrainer, "save_final", keep)
        yield runs


def flags(data, cache, out, **overrides) -> list[str]:
    values = dict(
        train_data_dir=data / "train",
        output_dir=out,
        cache_dir=cache,
        max_steps=3,
        train_batch_size=4,
        learning_rate=1e-3,
        log_every=1,
        checkpoint_every=3,
        ema_decay=0.9,
        report_to="none",
        seed=0,
    )
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def free_port() -> str:
    """A TCP port free now: each multi-process run gets its own, so two test runs at once (or another
    job on accelerate's default 29500) cannot join each other's process group and hang."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(accelerate_flags: list[str], args: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    if "--multi_gpu" in accelerate_flags and "--main_process_port" not in accelerate_flags:
        accelerate_flags = [*accelerate_flags, "--main_process_port", free_port()]
    command = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        *accelerate_flags,
        str(ROOT / "training" / "train.py"),
        *args,
    ]
    # Its own session, so that on a timeout the ranks go too (killing the launcher alone left them).
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"launch timed out after 300 s:\n{stdout[-3000:]}\n{stderr[-5000:]}") from None
    assert process.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return stdout + stderr


def run_killed_at(monkeypatch, step: int, run) -> None:
    """``run()`` with the machine going away (KeyboardInterrupt) as optimizer step ``step`` starts."""
    original = UNetTrainer.optimizer_step

    def crash(trainer, i):
        if i == step:
            raise KeyboardInterrupt("the machine went away")
        return original(trainer, i)

    monkeypatch.setattr(UNetTrainer, "optimizer_step", crash)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.undo()


def weights(folder: Path, part: str = "unet") -> dict[str, torch.Tensor]:
    return load_file(next((folder / part).glob("*.safetensors")))


def assert_same_training(a: Path, b: Path, part: str = "unet_raw") -> None:
    wa, wb = weights(a / "final", part), weights(b / "final", part)
    assert wa.keys() == wb.keys()
    difference = torch.cat([(wa[k].float() - wb[k].float()).abs().flatten() for k in wa])
    assert difference.mean() < 1e-6, f"mean difference {difference.mean():.2e}"
    far = (difference > 1e-5).float().mean()
    assert far < 1e-3, f"{far:.2%} of the weights differ by more than 1e-5"


@pytest.fixture(scope="module")
def single(data, cache, tmp_path_factory):
    """One process, batch 4, launched with the repository's accelerate config, TensorBoard on."""
    out = tmp_path_factory.mktemp("single")
    log = launch(
        ["--config_file", str(ROOT / "accelerate_config.yaml")],
        flags(
            data,
            cache,
            out,
            report_to="tensorboard",
            val_data_dir=data / "test",
            validation_prompts='["a red circle", "a blue square"]',
            validation_inference_steps=2,
        ),
    )
    return out, log


def test_a_launched_run_writes_a_folder_that_sdlite_and_diffusers_load(single):
    out, log = single
    final = out / "final"
    parts = load_components(final)
    assert parts.unet.config.sample_size == 8 and (final / "unet_raw").is_dir()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(final, local_files_only=True, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert (final / "train_config.yaml").is_file() and (out / "config.yaml").is_file()
    assert (out / "validation" / "step-3.png").is_file() and "val/loss" in log
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert (out / "checkpoint-3" / "COMPLETE").is_file()


def test_two_processes_train_like_one_with_the_same_global_batch(single, data, cache, tmp_path):
    log = launch(["--multi_gpu", "--num_processes", "2"], flags(data, cache, tmp_path, train_batch_size=2))
    assert "global batch 4" in log  # 2 processes x 2
    assert "0 latents computed" in log and "0 text embeddings computed" in log  # the cache hits
    one, two = single[0], tmp_path
    assert_same_training(one, two)
    assert_same_training(one, two, "unet")  # the EMA too
    # the schedule stepped once per optimizer step, not once per process
    states = [json.loads((d / "checkpoint-3" / "state.json").read_text()) for d in (one, two)]
    assert (
        states[0]["lr_schedule"] == states[1]["lr_schedule"] and states[1]["lr_schedule"]["last_epoch"] == 3
    )


def test_gradient_accumulation_trains_like_a_larger_batch(single, data, cache, tmp_path):
    main(flags(data, cache, tmp_path, train_batch_size=2, gradient_accumulation_steps=2))
    assert_same_training(single[0], tmp_path)
    state = json.loads((tmp_path / "checkpoint-3" / "state.json").read_text())
    assert state["lr_schedule"]["last_epoch"] == 3


def test_training_without_the_cache_is_the_same_training(single, data, cache, tmp_path):
    main(flags(data, tmp_path / "unused", tmp_path, cache_latents="false", cache_text="false"))
    assert not (tmp_path / "unused").exists()
    assert_same_training(single[0], tmp_path)


def test_an_interrupted_run_resumed_from_its_checkpoint_ends_with_the_same_weights(
    data, cache, tmp_path, monkeypatch
):
    options = dict(
        max_steps=6,
        checkpoint_every=3,
        lr_scheduler="cosine",
        lr_warmup_steps=2,
        random_flip="true",
        caption_dropout=0.25,
        noise_offset=0.1,
        val_data_dir=data / "test",
    )
    main(flags(data, cache, tmp_path / "whole", **options))
    run_killed_at(monkeypatch, 4, lambda: main(flags(data, cache, tmp_path / "broken", **options)))
    assert not (tmp_path / "broken" / "final").exists()
    main(flags(data, cache, tmp_path / "broken", resume="latest", **options))
    for part in ("unet_raw", "unet"):
        a, b = weights(tmp_path / "whole" / "final", part), weights(tmp_path / "broken" / "final", part)
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_fine_tuning_starts_from_a_pretrained_folder_with_a_separately_trained_vae(
    single, data, cache, tmp_path
):
    pretrained = single[0] / "final"
    vae = build_components("tiny", seed=1).vae
    vae.register_to_config(scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "my-vae" / "vae")  # as train_vae.py writes it: output_dir/vae
    main(flags(data, cache, tmp_path / "run", pretrained=pretrained, vae_path=tmp_path / "my-vae",
               max_steps=1, learning_rate=1e-6, checkpoint_every=0, ema_decay="none"))  # fmt: skip
    before, after = weights(pretrained), weights(tmp_path / "run" / "final")
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-5  # one step at lr 1e-6
    saved = load_components(tmp_path / "run" / "final").vae
    assert saved.config.scaling_factor == 0.5
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in saved.state_dict().items())


def test_v_prediction_min_snr_zero_terminal_snr_and_a_trained_text_encoder(data, cache, tmp_path):
    main(
        flags(
            data,
            cache,
            tmp_path,
            max_steps=2,
            checkpoint_every=0,
            prediction_type="v_prediction",
            snr_gamma=5.0,
            rescale_betas_zero_snr="true",
            train_text_encoder="true",
            random_crop="true",
            gradient_checkpointing="true",
            channels_last="true",
            ema_decay="none",
        )
    )
    parts = load_components(tmp_path / "final")
    config = parts.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == (
        "v_prediction",
        True,
        "trailing",
    )
    assert parts.scheduler.alphas_cumprod[-1] == 0
    initial = build_components("tiny", seed=0).text_encoder.state_dict()
    trained = parts.text_encoder.state_dict()
    assert any(not torch.equal(initial[k], trained[k]) for k in initial)  # the text encoder learned
    assert not (tmp_path / "final" / "unet_raw").exists()  # no EMA: unet/ holds the trained weights


def test_a_text_encoder_of_0_layers_keeps_each_token_apart_and_loads_in_diffusers(data, cache, tmp_path):
    main(flags(data, cache, tmp_path, max_steps=1, checkpoint_every=0, ema_decay="none",
               train_text_encoder="true", text_encoder_layers=0))  # fmt: skip
    final = tmp_path / "final"
    assert load_components(final).text_encoder.config.num_hidden_layers == 0
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(final, local_files_only=True, safety_checker=None)
    states = [pipe.encode_prompt(p, "cpu", 1, False)[0][0] for p in ("a red circle", "a blue circle")]
    # bos, a, red|blue, circle, eos...: only the colour's own position differs, as no token sees another
    differs = [not torch.equal(a, b) for a, b in zip(*states)]
    assert differs[:5] == [False, False, True, False, False]
    assert pipe("a red circle", num_inference_steps=2, output_type="np").images[0].shape == (32, 32, 3)


def test_a_narrower_u_net_from_scratch_trains_saves_and_loads_with_its_widths(data, cache, tmp_path):
    # The demo's shape: narrower, and no middle block or ResNet block in the lowest level's down block
    main(flags(data, cache, tmp_path, max_steps=1, checkpoint_every=0, ema_decay="none",
               unet_block_out_channels="32,64,64", unet_mid_block="false",
               unet_layers_per_block="1,1,0"))  # fmt: skip
    unet = load_components(tmp_path / "final").unet
    assert list(unet.config.block_out_channels) == [32, 64, 64]
    assert unet.up_blocks[0].resnets[0].conv1.out_channels == 64  # the lowest level, 128 in the preset
    assert unet.config.mid_block_type is None and unet.mid_block is None
    assert [len(b.resnets) for b in unet.down_blocks] == [1, 1, 0]
    assert [len(b.resnets) for b in unet.up_blocks] == [1, 2, 2]  # lowest level first
    assert sum(p.numel() for p in unet.parameters()) < 0.5 * sum(
        p.numel() for p in build_components("tiny", seed=0).unet.parameters()
    )


def test_min_snr_weights_for_epsilon_and_v():
    snr = torch.tensor([0.0, 0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weight(snr, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 1.0, 0.25]))
    torch.testing.assert_close(
        min_snr_weight(snr, 5.0, "v_prediction"), torch.tensor([0.0, 0.5 / 1.5, 5 / 6, 5 / 21])
    )


RECIPES = {"sd15-finetune.yaml": TrainConfig, "sd15-lora.yaml": TrainConfig, "tiny-shapes.yaml": TrainConfig,
           "tiny-lora.yaml": TrainConfig, "tiny-vae.yaml": VAETrainConfig,
           "tiny-sdxl-shapes.yaml": TrainConfig, "demo-lcm.yaml": TrainConfig,
           "demo-inpaint.yaml": TrainConfig}  # fmt: skip


def test_every_recipe_in_configs_is_covered():
    assert {path.name for path in (ROOT / "configs").glob("*.yaml")} == set(RECIPES)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_each_recipe_sets_exactly_its_keys_to_valid_settings(recipe):
    path = ROOT / "configs" / recipe
    cfg = parse_config(RECIPES[recipe], ["--config", str(path)])
    written = yaml.safe_load(path.read_text())
    assert {key: get(cfg, key) for key in written} == written  # every key read, with its value
    cfg.check()  # the settings a trainer accepts


@pytest.mark.parametrize("config", [TrainConfig, VAETrainConfig])
def test_help_describes_every_option(config, capsys):
    docs = field_docs(config)
    missing = [f.name for f in keys(config).values() if not docs.get(f.name, ("", ""))[1]]
    assert not missing, f"options without a description: {missing}"
    with pytest.raises(SystemExit) as done:
        parse_config(config, ["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for f in keys(config).values():
        assert f"--{f.name} {f.name.upper()} {' '.join(docs[f.name][1].split())}" in text, f.name


def test_the_script_prints_its_help_with_descriptions():
    result = subprocess.run([sys.executable, str(ROOT / "training" / "train.py"), "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())
    assert "--max_steps MAX_STEPS optimizer steps to train for, in all (default: 1000)" in text
    assert "LoRA: train low-rank adapters" in text  # the sections title their groups


@pytest.mark.parametrize(
    "flag, ours",
    [("--max_train_steps", "max_steps"), ("--pretrained_model_name_or_path", "pretrained"),
     ("--rank", "lora_rank"), ("--checkpointing_steps", "checkpoint_every")],
)  # fmt: skip
def test_a_diffusers_flag_reads_as_ours(flag, ours, capsys):
    for argv in ([flag, "10"], [f"{flag}=10"]):
        assert str(get(parse_config(TrainConfig, argv), ours)) == "10"
        assert f"{flag} -> --{ours}" in capsys.readouterr().err


def test_a_diffusers_key_in_a_yaml_file_fails_naming_ours(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("max_train_steps: 10\n")
    with pytest.raises(ConfigError, match="--max_train_steps is diffusers' name; sdlite's is --max_steps"):
        parse_config(TrainConfig, ["--config", str(path)])


@pytest.mark.parametrize(("flag", "ours"), [("sample_prompts", "--validation_prompts_file"),
                                            ("sample_every_n_steps", "--validation_every")])  # fmt: skip
def test_an_sd_scripts_flag_reads_as_ours_and_its_yaml_key_fails_naming_ours(flag, ours, tmp_path):
    assert str(get(parse_config(TrainConfig, [f"--{flag}", "1"]), ours[2:])) == "1"
    (tmp_path / "recipe.yaml").write_text(f"{flag}: 1\n")  # a key in a YAML file: refused, naming ours
    with pytest.raises(ConfigError, match=f"--{flag} is sd-scripts' name; sdlite's is {ours}"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "recipe.yaml")])


@pytest.mark.parametrize("config", [TrainConfig, VAETrainConfig])
def test_each_flag_named_as_the_equivalent_of_a_diffusers_flag_exists(config):
    names = set(keys(config))
    for theirs, hint in config.FOREIGN_FLAGS.items():
        assert theirs not in names
        if hint.startswith("--"):
            assert hint[2:].split()[0] in names, hint


def test_the_configs_import_no_torch_and_default_to_the_lora_targets_of_sdlite_lora():
    code = "import sys, training.config.unet, training.config; print(sorted(sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "'torch'" not in result.stdout and "'peft'" not in result.stdout
    from sdlite import lora

    assert lora_config.UNET_TARGETS == lora.UNET_TARGETS
    assert lora_config.TEXT_ENCODER_TARGETS == lora.TEXT_ENCODER_TARGETS


def test_bad_settings_fail_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="prediction_type"):
        main(flags(data, tmp_path, tmp_path, prediction_type="x0"))
    with pytest.raises(ValueError, match="caption_dropout"):
        main(flags(data, tmp_path, tmp_path, caption_dropout=1.5))
    with pytest.raises(ValueError, match="text_encoder_layers=-1 must be >= 0"):
        main(flags(data, tmp_path, tmp_path, text_encoder_layers=-1))
    with pytest.raises(ValueError, match="text_encoder_layers: for a text encoder built from scratch"):
        main(flags(data, tmp_path, tmp_path, text_encoder_layers=0, pretrained=tmp_path))
    with pytest.raises(ValueError, match=r"preset 'tiny' has 3 levels, give 3 widths"):
        main(flags(data, tmp_path, tmp_path, unet_block_out_channels="32,64"))
    with pytest.raises(ValueError, match="positive multiple of 16 .the GroupNorm groups"):
        main(flags(data, tmp_path, tmp_path, unet_block_out_channels="32,64,72"))
    with pytest.raises(ValueError, match="at least 32: at 16 wide each of the 16 GroupNorm groups holds one"):
        main(flags(data, tmp_path, tmp_path, unet_block_out_channels="16,32,64"))
    with pytest.raises(ValueError, match="unet_block_out_channels: for a U-Net built from scratch"):
        main(flags(data, tmp_path, tmp_path, unet_block_out_channels="32,64,64", pretrained=tmp_path))
    with pytest.raises(ValueError, match="unet_mid_block: false is for a U-Net built from scratch"):
        main(flags(data, tmp_path, tmp_path, unet_mid_block="false", pretrained=tmp_path))
    with pytest.raises(ValueError, match=r"preset 'tiny' has 3 levels, give 3 counts"):
        main(flags(data, tmp_path, tmp_path, unet_layers_per_block="1,1"))
    with pytest.raises(ValueError, match="level 1 has no ResNet block to take 32 channels to 64"):
        main(flags(data, tmp_path, tmp_path, unet_layers_per_block="1,0,1"))
    with pytest.raises(ValueError, match="unet_layers_per_block: for a U-Net built from scratch"):
        main(flags(data, tmp_path, tmp_path, unet_layers_per_block="1,1,1", pretrained=tmp_path))
    with pytest.raises(ValueError, match="nonfinite_loss"):
        main(flags(data, tmp_path, tmp_path, nonfinite_loss="ignore"))
    with pytest.raises(SystemExit):
        main(["--max_stepz", "3"])
    assert not (tmp_path / "config.yaml").exists()  # nothing was started
