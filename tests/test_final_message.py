"""The end of a training run names the files it wrote and a ready-to-paste ``sdlite generate`` line."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

from sdlite.cli import build_parser, final_message, main
from sdlite.ddpm import DDPMScheduler
from sdlite.models import build_components, save_components
from training.closing import closing_message
from training.config.keys import parse_config
from training.config.unet import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def generate_line(message: str) -> list[str]:
    lines = [line for line in message.splitlines() if line.startswith("generate with: ")]
    assert len(lines) == 1, message
    return shlex.split(lines[0].removeprefix("generate with: "))


def test_a_lora_runs_message_names_its_files_and_a_generate_line_on_its_base(tmp_path):
    final = tmp_path / "my run" / "final"  # a space: the line quotes it
    final.mkdir(parents=True)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors", "train_config.yaml", ".lock"):
        (final / name).write_bytes(b"")
    message = final_message(final, "models/base", "mystar, a small orange star", lora=True)
    first = message.splitlines()[0]
    assert first.startswith(f"saved {final}: ")
    assert "lora_kohya.safetensors (the LoRA in kohya's layout: A1111, ComfyUI)" in first
    assert (
        "pytorch_lora_weights.safetensors" in first and "train_config.yaml" in first and ".lock" not in first
    )
    argv = generate_line(message)
    assert argv[:2] == ["sdlite", "generate"]
    args = build_parser().parse_args(argv[1:])  # generate's real flags: it parses as typed
    assert args.model == "models/base" and args.prompt == "mystar, a small orange star"
    assert args.lora == [(str(final / "pytorch_lora_weights.safetensors"), 0.8)]


def test_a_full_runs_message_generates_with_the_folder_and_a_preset_lora_says_why_not(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    argv = generate_line(final_message(tmp_path, None, "a red circle", lora=False))
    assert "unet/" in final_message(tmp_path, None, "a red circle", lora=False)
    args = build_parser().parse_args(argv[1:])
    assert args.model == str(tmp_path) and args.lora == [] and args.prompt == "a red circle"
    message = final_message(tmp_path, None, "a red circle", lora=True)
    assert "generate with" not in message and "random weights" in message


def test_the_closing_line_of_a_distilled_an_inpainting_and_a_new_words_run(tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (tmp_path / "model_index.json").write_text("{}")
    base = ["--pretrained_model_name_or_path", "models/base", "--validation_prompts", "a red circle"]
    lcm = parse_config(TrainConfig, [*base, "--lora", "true", "--distill", "lcm"])
    args = build_parser().parse_args(generate_line(closing_message(lcm, tmp_path, True, False))[1:])
    assert (args.scheduler, args.num_inference_steps, args.guidance_scale) == ("lcm", 4, 1.0)
    assert args.lora == [(str(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)]
    assert args.model == "models/base"
    inpaint = parse_config(TrainConfig, [*base, "--inpainting", "true", "--cache_latents", "false"])
    args = build_parser().parse_args(generate_line(closing_message(inpaint, tmp_path, False, True))[1:])
    assert (args.model, args.image, args.mask, args.lora) == (str(tmp_path), "IN.png", "MASK.png", [])
    word = parse_config(TrainConfig, [*base, "--textual_inversion_token", "<mystar>"])
    message = closing_message(word, tmp_path, False, False)
    assert "pytorch_lora_weights.safetensors" in message and "'<mystar>'" in message
    assert "load_textual_inversion" in message and "models/base" in message


def test_a_lora_training_run_ends_with_a_generate_line_that_runs(data, cache, tmp_path):
    base = save_components(build_components("tiny", seed=0), tmp_path / "base")
    flags = {
        "pretrained": base, "lora": "true", "train_data_dir": data / "train", "output_dir": tmp_path / "run",
        "cache_dir": cache, "max_steps": 1, "train_batch_size": 2, "report_to": "none",
        "validation_prompts": "a blue square",
    }  # fmt: skip
    command = [sys.executable, str(ROOT / "training" / "train.py")]
    command += [text for key, value in flags.items() for text in (f"--{key}", str(value))]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    argv = generate_line(done.stdout)
    assert argv[argv.index("--model") + 1] == str(base) and argv[-1] == "a blue square"
    out = tmp_path / "lora.png"
    assert main([*argv[1:], "--num_inference_steps", "1", "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    # The trainer's entry point drops the same third-party noise as the sdlite command.
    assert "requires torchvision (not installed)" not in done.stderr


def test_a_distillations_closing_line_says_so_when_its_schedule_ends_far_noisier_than_sds(tmp_path):
    """The DDPM paper's linear β (the demo's) ends at ᾱ = 4e-5: LCMScheduler's first steps draw noise."""
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    base = ["--pretrained_model_name_or_path", "models/base", "--validation_prompts", "a red circle"]
    lcm = parse_config(TrainConfig, [*base, "--lora", "true", "--distill", "lcm"])
    linear = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    scaled = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    message = closing_message(lcm, tmp_path, True, False, linear)
    assert "ε error by 157, against 14.6" in message and "--timesteps" in message
    generate_line(message)  # still one line to paste
    assert "--timesteps" not in closing_message(lcm, tmp_path, True, False, scaled)  # SD's: as LCM made it
    assert "--timesteps" not in closing_message(lcm, tmp_path, False, False, linear)  # not a distillation
