"""diffusers' and kohya's training flags read as sdlite's (training/foreign_flags.py): their README
command lines parse with only the script replaced, a flag without an equivalent is refused naming
what to use, every problem of a command line is reported at once, in one line."""

import io
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file

from sdlite.data.captions import IMAGE_EXTENSIONS
from sdlite.models import build_components
from training import epochs
from training.config import VAETrainConfig, parse_config
from training.config.unet import TrainConfig
from training.foreign_flags import read_as_ours

ROOT = Path(__file__).resolve().parents[1]

# The README examples of diffusers' scripts, $DATASET_NAME replaced by a local folder (sdlite downloads
# nothing) and --push_to_hub left out; the LoRA ones with --lora true.
TEXT_TO_IMAGE = """--pretrained_model_name_or_path=$MODEL_NAME --train_data_dir=$TRAIN_DIR --use_ema
  --resolution=512 --center_crop --random_flip --train_batch_size=1 --gradient_accumulation_steps=4
  --gradient_checkpointing --max_train_steps=15000 --learning_rate=1e-05 --max_grad_norm=1
  --lr_scheduler="constant" --lr_warmup_steps=0 --output_dir="sd-pokemon-model" """
TEXT_TO_IMAGE_LORA = """--lora true --pretrained_model_name_or_path=$MODEL_NAME --train_data_dir=$TRAIN_DIR
  --caption_column="text" --resolution=512 --random_flip --train_batch_size=1 --num_train_epochs=100
  --checkpointing_steps=5000 --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0
  --seed=42 --output_dir="sd-pokemon-model-lora" --validation_prompt="cute dragon creature"
  --report_to="wandb" """
SDXL = """--pretrained_model_name_or_path=$MODEL_NAME --pretrained_vae_model_name_or_path=$VAE_NAME
  --train_data_dir=$TRAIN_DIR --enable_xformers_memory_efficient_attention --resolution=512 --center_crop
  --random_flip --proportion_empty_prompts=0.2 --train_batch_size=1 --gradient_accumulation_steps=4
  --gradient_checkpointing --max_train_steps=10000 --use_8bit_adam --learning_rate=1e-06
  --lr_scheduler="constant" --lr_warmup_steps=0 --mixed_precision="fp16" --report_to="wandb"
  --validation_prompt="a cute Sundar Pichai creature" --validation_epochs 5 --checkpointing_steps=5000
  --output_dir="sdxl-pokemon-model" """
SDXL_LORA = """--lora true --pretrained_model_name_or_path=$MODEL_NAME
  --pretrained_vae_model_name_or_path=$VAE_NAME --train_data_dir=$TRAIN_DIR --caption_column="text"
  --resolution=1024 --random_flip --train_batch_size=1 --num_train_epochs=2 --checkpointing_steps=500
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 --mixed_precision="fp16" --seed=42
  --output_dir="sd-pokemon-model-lora-sdxl-txt" --train_text_encoder
  --validation_prompt="cute dragon creature" --report_to="wandb" """
DREAMBOOTH_LORA = """--lora true --pretrained_model_name_or_path=$MODEL_NAME --instance_data_dir=$INSTANCE_DIR
  --output_dir=$OUTPUT_DIR --instance_prompt="a photo of sks dog" --resolution=512 --train_batch_size=1
  --gradient_accumulation_steps=1 --checkpointing_steps=100 --learning_rate=1e-4 --report_to="wandb"
  --lr_scheduler="constant" --lr_warmup_steps=0 --max_train_steps=500
  --validation_prompt="A photo of sks dog in a bucket" --validation_epochs=50 --seed="0" """


def images(folder: Path, count: int, size=(40, 32)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new("RGB", size, (10 * i, 90, 200)).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(f"mystar, a small orange star {i}")
    return folder


def command(text: str, **paths) -> list[str]:
    for name, path in paths.items():
        text = text.replace(f"${name}", str(path))
    return shlex.split(text)


def test_the_readme_command_lines_of_diffusers_scripts_read_as_ours(tmp_path, capsys):
    train = images(tmp_path / "train", 10)  # 10 images: an epoch of batch 1 is 10 steps
    paths = dict(MODEL_NAME=tmp_path / "base", VAE_NAME=tmp_path / "vae", TRAIN_DIR=train,
                 INSTANCE_DIR=train, OUTPUT_DIR=tmp_path / "out")  # fmt: skip
    full = parse_config(TrainConfig, command(TEXT_TO_IMAGE, **paths))
    assert (full.model.pretrained, full.data.train_data_dir) == (str(tmp_path / "base"), str(train))
    assert (full.optimizer.ema_decay, full.data.random_crop, full.data.random_flip,
            full.run.gradient_checkpointing) == (0.9999, False, True, True)  # fmt: skip
    assert (
        full.optimizer.max_steps,
        full.optimizer.learning_rate,
        full.optimizer.gradient_accumulation_steps,
    ) == (15000, 1e-5, 4)
    lora = parse_config(TrainConfig, command(TEXT_TO_IMAGE_LORA, **paths))
    assert lora.adapters.lora and lora.optimizer.max_steps == 100 * 10 and lora.run.checkpoint_every == 5000
    assert lora.validation.validation_prompts == ["cute dragon creature"] and lora.run.report_to == "wandb"
    xl = parse_config(TrainConfig, command(SDXL, **paths))
    assert (xl.model.vae_path, xl.data.caption_dropout, xl.optimizer.use_8bit_adam) == (
        str(tmp_path / "vae"),
        0.2,
        True,
    )
    assert xl.validation.validation_every == 5 * 3  # ceil(10 micro-steps / 4) optimizer steps an epoch
    xl_lora = parse_config(TrainConfig, command(SDXL_LORA, **paths))
    assert (
        xl_lora.adapters.lora_text_encoder
        and not xl_lora.model.train_text_encoder
        and xl_lora.optimizer.max_steps == 20
    )
    dreambooth = parse_config(TrainConfig, command(DREAMBOOTH_LORA, **paths))
    assert (dreambooth.dreambooth.instance_data_dir, dreambooth.dreambooth.instance_prompt) == (
        str(train),
        "a photo of sks dog",
    )
    assert dreambooth.validation.validation_every == 500  # 50 epochs of 10 photos
    err = capsys.readouterr().err
    assert "diffusers/kohya flags read as sdlite's: --pretrained_model_name_or_path -> --pretrained" in err
    assert "--num_train_epochs 100 -> --max_steps 1000 (10 images / 1 a batch / 1 micro-steps)" in err


def test_the_mapping_is_one_line_and_each_difference_is_said_once(capsys):
    out = io.StringIO()
    read_as_ours(
        TrainConfig, ["--center_crop", "--resume_from_checkpoint", "latest", "--resume", "latest"], out=out
    )
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("diffusers/kohya flags read as sdlite's: --center_crop -> --random_crop false")
    assert len(lines) == 2 and sum("resume is exact" in line for line in lines) == 1
    out = io.StringIO()  # a diffusers line without --center_crop: their scripts would crop at random
    read_as_ours(TrainConfig, ["--checkpointing_steps", "5", "--rank", "4"], out=out)
    assert out.getvalue().count("diffusers' scripts crop at random unless --center_crop") == 1
    out = io.StringIO()
    read_as_ours(TrainConfig, ["--checkpointing_steps", "5", "--random_crop", "true"], out=out)
    assert "crop" not in out.getvalue()


def test_nothing_is_printed_for_sdlites_own_flags_nor_by_the_other_processes(monkeypatch):
    out = io.StringIO()
    assert read_as_ours(TrainConfig, ["--max_steps", "3"], out=out) == ["--max_steps=3"]
    monkeypatch.setenv("RANK", "1")
    read_as_ours(TrainConfig, ["--max_train_steps", "3"], out=out)
    assert out.getvalue() == ""


def test_their_switches_take_no_value_and_ours_still_take_true_or_false():
    cfg = parse_config(
        TrainConfig, ["--random_flip", "--center_crop", "--gradient_checkpointing", "--seed", "3"]
    )
    assert (
        cfg.data.random_flip
        and not cfg.data.random_crop
        and cfg.run.gradient_checkpointing
        and cfg.optimizer.seed == 3
    )
    cfg = parse_config(TrainConfig, ["--random_flip", "false", "--use_ema", "false"])
    assert not cfg.data.random_flip and cfg.optimizer.ema_decay == TrainConfig().optimizer.ema_decay
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--center_crop", "512"])


def test_a_validation_prompt_with_commas_is_one_prompt(tmp_path):
    prompt = "mystar, a small orange star"
    assert parse_config(TrainConfig, ["--validation_prompt", prompt]).validation.validation_prompts == [
        prompt
    ]
    assert parse_config(TrainConfig, [f"--validation_prompts={prompt}"]).validation.validation_prompts == [
        prompt
    ]
    several = ["--validation_prompts", prompt, "a red circle", "--validation_prompts", "a blue square"]
    assert parse_config(TrainConfig, several).validation.validation_prompts == [
        prompt,
        "a red circle",
        "a blue square",
    ]
    listed = parse_config(TrainConfig, ["--validation_prompts", '["a, b", "c"]'])
    assert listed.validation.validation_prompts == ["a, b", "c"]
    (tmp_path / "c.yaml").write_text(f'validation_prompts: ["{prompt}", "a red circle"]\n')
    from_yaml = parse_config(TrainConfig, ["--config", str(tmp_path / "c.yaml")])
    assert from_yaml.validation.validation_prompts == [prompt, "a red circle"]


def test_every_problem_of_a_command_line_is_one_line_at_once(capsys):
    argv = [
        "--dataset_name",
        "lambdalabs/pokemon",
        "--push_to_hub",
        "--max_stepz",
        "3",
        "--clip_skip",
        "2",
        "--save_model_as",
        "ckpt",
        "--network_module",
        "lycoris.kohya",
    ]
    start = time.process_time()  # CPU time: the machine's other work does not count
    with pytest.raises(SystemExit) as failed:
        parse_config(TrainConfig, argv)
    assert time.process_time() - start < 0.5 and failed.value.code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1
    for expected in ("--dataset_name: give --train_data_dir", "--push_to_hub: sdlite uploads nothing",
                     "--max_stepz is not a setting of this trainer (did you mean --max_steps?)",
                     "--clip_skip: not supported",
                     "--save_model_as ckpt: sdlite writes safetensors",
                     "--network_module lycoris.kohya: sdlite trains networks.lora"):  # fmt: skip
        assert expected in error[0]


def test_kohya_train_network_flags_read_as_ours(tmp_path, capsys):
    argv = shlex.split(
        "--pretrained_model_name_or_path base --network_module networks.lora --network_dim 16 "
        "--network_alpha 8 --save_model_as safetensors --enable_bucket --min_bucket_reso 256 "
        "--max_bucket_reso 1024 --bucket_reso_steps 64 --bucket_no_upscale --resolution 512,512 "
        "--caption_extension .txt --keep_tokens 1 "
        "--shuffle_caption --save_every_n_steps 100 --output_dir out --output_name mylora "
        "--learning_rate 1e-4 --unet_lr 2e-4 --network_train_unet_only --mixed_precision bf16 "
        "--max_train_steps 10 --sample_prompts p.txt --sample_every_n_steps 5 --min_snr_gamma 5"
    )
    cfg = parse_config(TrainConfig, argv)
    assert (
        cfg.adapters.lora,
        cfg.adapters.lora_rank,
        cfg.adapters.lora_alpha,
        cfg.adapters.lora_save_format,
    ) == (True, 16, 8.0, "kohya")
    assert (
        cfg.captions.aspect_buckets,
        cfg.captions.bucket_min_side,
        cfg.captions.bucket_max_side,
        cfg.data.resolution,
    ) == (
        True,
        256,
        1024,
        512,
    )
    assert (cfg.captions.keep_tokens, cfg.captions.shuffle_caption, cfg.run.checkpoint_every) == (
        1,
        True,
        100,
    )
    assert (cfg.captions.bucket_step, cfg.captions.bucket_no_upscale) == (64, True)
    assert cfg.run.final_dir == str(Path("out") / "mylora") and not cfg.adapters.lora_text_encoder
    assert (cfg.optimizer.learning_rate, cfg.adapters.text_encoder_lr) == (
        2e-4,
        1e-4,
    )  # --unet_lr wins; the rest the encoder's
    assert (
        cfg.validation.validation_prompts_file,
        cfg.validation.validation_every,
        cfg.optimizer.snr_gamma,
    ) == ("p.txt", 5, 5.0)
    refused = [
        ("--resolution 512,768", "give one number"),
        ("--caption_extension .cap", "rename"),
        ("--network_args conv_dim=4", "LoRA variants are not supported"),
        ("--save_model_as pt", "use safetensors"),
    ]
    for bad, says in refused:
        with pytest.raises(SystemExit):
            parse_config(TrainConfig, shlex.split(bad))
        assert says in capsys.readouterr().err


def test_epochs_become_steps_only_where_the_folder_tells_the_size(tmp_path, capsys):
    images(tmp_path / "train" / "10_mystar", 3)  # kohya's repeat folder: 30 items an epoch
    images(tmp_path / "train" / "plain", 2)
    argv = ["--train_data_dir", str(tmp_path / "train"), "--train_batch_size", "4", "--max_train_epochs", "2"]
    assert parse_config(TrainConfig, argv).optimizer.max_steps == 2 * 8  # ceil(32 / 4)
    table = tmp_path / "rows.parquet"
    table.write_bytes(b"")
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--train_data_dir", str(table), "--num_train_epochs", "2"])
    assert "--num_train_epochs: sdlite counts optimizer steps: give --max_steps" in capsys.readouterr().err
    explicit = parse_config(TrainConfig, [*argv, "--max_train_steps", "7"])
    assert explicit.optimizer.max_steps == 7  # as in their scripts, steps win over epochs


def test_the_image_extensions_counted_are_those_sdlite_reads():
    assert epochs.IMAGE_EXTENSIONS == IMAGE_EXTENSIONS


def test_a_flag_this_trainer_does_not_take_names_why(capsys):
    with pytest.raises(SystemExit):
        parse_config(VAETrainConfig, ["--rank", "4", "--validation_prompt", "a red circle"])
    err = capsys.readouterr().err
    assert "--rank is read as --lora_rank, which this trainer does not take" in err
    assert "--validation_prompt: this trainer draws no validation images" in err


def test_the_translation_imports_no_torch():
    code = (
        "import sys; from training.config import parse_config; "
        "from training.config.unet import TrainConfig; "
        "parse_config(TrainConfig, ['--max_train_steps', '3', '--network_dim', '4']); "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.stdout.strip() == "False", result.stderr[-2000:]


def test_a_dreambooth_lora_command_line_of_diffusers_trains(tmp_path, capsys):
    """diffusers' train_dreambooth_lora.py README line, with the script replaced and --lora true, on a
    tiny base for 2 steps: the LoRA file is written and the run's config holds what the flags meant."""
    base = build_components("tiny", seed=0).save_pretrained(tmp_path / "base")
    subject = images(tmp_path / "sks", 3, size=(32, 32))
    argv = command(DREAMBOOTH_LORA, MODEL_NAME=base, INSTANCE_DIR=subject, OUTPUT_DIR=tmp_path / "out")
    argv = [a.replace("512", "32").replace("wandb", "none") for a in argv]
    argv = [a for a in argv if not a.startswith(("--max_train_steps", "--validation_epochs"))]
    argv += ["--max_train_steps=2", "--validation_epochs=1", f"--cache_dir={tmp_path / 'cache'}",
             "--validation_inference_steps=2"]  # fmt: skip
    from training.train import main

    final = main(argv)
    assert load_file(final / "pytorch_lora_weights.safetensors")
    saved = yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())
    assert (saved["lora"], saved["max_steps"], saved["validation_every"]) == (True, 2, 3)
    assert saved["validation_prompts"] == ["A photo of sks dog in a bucket"]
    assert "--validation_epochs 1 -> --validation_every 3" in capsys.readouterr().err


def test_help_says_each_validation_prompt_value_is_one_prompt(capsys):
    with pytest.raises(SystemExit):
        parse_config(TrainConfig, ["--help"])
    assert "each value is one prompt, commas and all" in " ".join(capsys.readouterr().out.split())


def test_a_diffusers_checkpoint_name_is_read_in_output_dir(tmp_path):
    """diffusers' --resume_from_checkpoint takes "latest" or a checkpoint's name in output_dir."""
    out = ["--output_dir", str(tmp_path)]
    assert parse_config(TrainConfig, [*out, "--resume_from_checkpoint", "latest"]).run.resume == "latest"
    named = parse_config(TrainConfig, ["--resume_from_checkpoint", "checkpoint-500", *out])
    assert named.run.resume == str(tmp_path / "checkpoint-500")
    (tmp_path / "elsewhere").mkdir()
    path = parse_config(TrainConfig, [*out, "--resume_from_checkpoint", str(tmp_path / "elsewhere")])
    assert path.run.resume == str(tmp_path / "elsewhere")
