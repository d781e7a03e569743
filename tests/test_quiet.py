"""Third-party lines that tell an sdlite user nothing are dropped from our commands, by their text
(training/quiet.py); the other lines of the same loggers are kept."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdlite.lora import LoraSettings, adapter_parameters, add_lora, save_lora
from sdlite.models import build_components, save_components
from training.quiet import DropNoise, quiet_third_party

ROOT = Path(__file__).resolve().parents[1]
NOISE = (
    "requires torchvision (not installed)",
    "No LoRA keys associated to",
    "were not passed to `accelerate launch`",
)


def run_sdlite(argv: list[str], **env) -> subprocess.CompletedProcess:
    """``sdlite ARGV`` in a fresh process (transformers notes what it lacks once per process, at import)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    command = [sys.executable, "-m", "training.cli", *argv]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


@pytest.fixture(scope="module")
def model_and_unet_lora(tmp_path_factory):
    """A tiny model folder and a LoRA of its U-Net alone (no text-encoder part, as most LoRAs)."""
    folder = tmp_path_factory.mktemp("quiet")
    parts = build_components("tiny", seed=0)
    model = save_components(parts, folder / "model")
    add_lora(parts.unet, None, LoraSettings(rank=4))
    with torch.no_grad():
        for p in adapter_parameters(parts.unet):
            p.normal_(0, 0.1)
    return model, save_lora(folder / "lora", parts.unet)


def test_generate_with_a_unet_only_lora_prints_no_third_party_noise(model_and_unet_lora, tmp_path):
    model, lora = model_and_unet_lora
    out = tmp_path / "x.png"
    argv = ["generate", "a red circle", "--model", str(model), "--lora", f"{lora}:0.8", "--steps", "1"]
    done = run_sdlite(argv + ["--out", str(out)])
    assert out.exists() and f"wrote {out}" in done.stdout
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in NOISE)], done.stderr


def test_sdlite_launch_without_an_accelerate_config_prints_no_default_config_warning(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text('print("trainer ran")\n')
    done = run_sdlite(["launch", str(script)], HF_HOME=str(tmp_path / "hf"))  # no accelerate config there
    assert "trainer ran" in done.stdout
    assert "accelerate launch" not in done.stderr, done.stderr


def _kept(logger: str, message: str) -> bool:
    quiet_third_party()
    record = logging.LogRecord(logger, logging.WARNING, __file__, 0, message, None, None)
    return bool(logging.getLogger(logger).filter(record))


def test_the_filters_drop_only_the_lines_they_name():
    defaults = "The following values were not passed to `accelerate launch` and had defaults used instead:\n"
    one = "\t`--num_processes` was set to a value of `1`\n\t`--mixed_precision` was set to a value of `'no'`"
    threads = "\t`--num_cpu_threads_per_process` was set to `8` to improve out-of-box performance"
    assert not _kept("accelerate.commands.launch", defaults + one + "\n" + threads)
    # Several processes chosen for the user is news: kept.
    assert _kept("accelerate.commands.launch", defaults + "\t`--num_processes` was set to a value of `2`")
    te = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe"
    assert not _kept("diffusers.loaders.lora_base", te)
    assert not _kept("diffusers.loaders.lora_base", te.replace("'text_encoder'", "'text_encoder_2'"))
    assert _kept(
        "diffusers.loaders.peft", te.replace("'text_encoder'", "'unet'")
    )  # a LoRA with no U-Net part
    assert _kept("diffusers.loaders.lora_base", "Loading adapter weights from state_dict led to missing keys")
    assert not _kept(
        "transformers.utils.import_utils",
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
    )
    assert _kept("transformers.utils.import_utils", "Some other note")
    quiet_third_party()  # again: still one filter a logger
    assert sum(isinstance(f, DropNoise) for f in logging.getLogger("diffusers.loaders.peft").filters) == 1
