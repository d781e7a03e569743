"""Training options wired into train.py: data reliability keys (issue 15, items 7-10), kohya LoRA files
and the learning rate of every param group in the logs (issue 14). The tiny preset, 8 shapes images,
batch 4, 2 steps.
"""

import json
import shutil

import pytest
from accelerate import Accelerator

from sdlite.data.dataset import DataError
from sdlite.data.shapes import write_dataset
from sdlite.kohya import read_modules
from training.config import parse_config
from training.config.unet import TrainConfig
from training.run_folder import FINAL_MARKER
from training.train import UNetTrainer, main
from training.train_vae import main as train_vae


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=8, seed=0)


@pytest.fixture
def data(shapes, tmp_path):
    """A copy of the shapes folder, for a test to spoil."""
    return shutil.copytree(shapes, tmp_path / "data")


def flags(data, out, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=out.parent / "cache", max_steps=2,
                  train_batch_size=4, learning_rate=1e-3, log_every=1, checkpoint_every=0, report_to="none",
                  ema_decay="none")  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def listed(out) -> list[list[str]]:
    return [line.split("\t") for line in (out / "bad_files.txt").read_text().splitlines()]


# ---- data -----------------------------------------------------------------------------------------------


def test_a_bad_metadata_line_under_bad_data_skip_is_listed_and_the_run_trains(data, tmp_path):
    with open(data / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "000007.png", "text": 42}\n')  # line 9: a caption that is a number
        f.write('{"file_name": "000007.png", "text": \n')  # line 10: cut off
    out = tmp_path / "run"
    main(flags(data, out, bad_data="skip"))
    assert (out / "final" / "unet").is_dir()
    skipped = {name.rsplit(" ", 1)[-1] for name, _, action in listed(out) if action == "skipped"}
    assert skipped == {"9", "10"}
    with pytest.raises(DataError, match="metadata.jsonl line 9"):  # and bad_data error names it
        main(flags(data, tmp_path / "strict", bad_data="error"))


def test_an_image_broken_after_the_start_up_check_is_listed_in_bad_files(data, tmp_path):
    out = tmp_path / "run"
    trainer = UNetTrainer(parse_config(TrainConfig, flags(data, out, cache_latents="false")))
    (data / "000005.png").write_bytes(b"overwritten after the start-up check\n")  # read again in the loop
    trainer.train()  # 2 steps of 4: every row read once
    (entry,) = listed(out)
    assert entry[0].endswith("000005.png") and entry[1].startswith("not an image")
    assert entry[2].startswith("skipped (broke after the start-up check)")


def test_max_image_pixels_refuses_images_declaring_more(data, tmp_path):
    # 32 x 32 = 1024 pixels each: every image declares more than 1000, so none is usable.
    out = tmp_path / "run"
    with pytest.raises(DataError, match="none of the 8 rows has a usable image"):
        main(flags(data, out, max_image_pixels=1000))
    assert all("32x32 = 1024, over the limit of 1000" in problem for _, problem, _ in listed(out))


def test_a_table_naming_images_outside_its_folder_trains_only_when_allowed(shapes, tmp_path):
    table = tmp_path / "tables" / "train.jsonl"
    table.parent.mkdir()
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    table.write_text("".join(json.dumps({"image": str(shapes / r["file_name"]), "text": r["text"]}) + "\n"
                             for r in rows))  # fmt: skip
    with pytest.raises(DataError, match="outside"):
        main(flags(table, tmp_path / "refused", bad_data="error"))
    out = tmp_path / "allowed"
    main(flags(table, out, allow_outside_paths="true", max_steps=1))
    assert (out / "final" / "unet").is_dir() and not (out / "bad_files.txt").exists()


# ---- LoRA files and learning rates ------------------------------------------------------------------------


def recording_logs(monkeypatch) -> list[tuple[int, dict]]:
    """Every (step, values) the run passes to Accelerator.log, which sends them to TensorBoard."""
    logged, original = [], Accelerator.log

    def log(self, values, step=None, log_kwargs=None):
        logged.append((step, dict(values)))
        return original(self, values, step=step, log_kwargs=log_kwargs or {})

    monkeypatch.setattr(Accelerator, "log", log)
    return logged


@pytest.fixture(scope="module")
def lora_run(shapes, tmp_path_factory):
    """A LoRA run on the U-Net and the text encoder at two rates, alpha 2 != rank 4, kohya files, with
    what it logs."""
    out = tmp_path_factory.mktemp("lora") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        logged = recording_logs(monkeypatch)
        main(flags(shapes, out, lora="true", lora_rank=4, lora_alpha=2, lora_text_encoder="true",
                   text_encoder_lr=3e-4, lora_save_format="kohya", lora_from_scratch="true"))  # fmt: skip
    return out, logged


def test_lora_save_format_kohya_writes_a_kohya_file_with_the_runs_alpha(lora_run):
    out, _ = lora_run
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()  # the diffusers file too
    modules, layout, base = read_modules(out / "final" / "lora_kohya.safetensors")
    assert layout == "kohya" and base == "sdlite preset tiny"
    assert {part for part, _ in modules} == {"unet", "text_encoder"}
    assert {(m.rank, m.alpha) for m in modules.values()} == {(4, 2.0)}


def test_the_learning_rate_of_every_param_group_is_logged_by_name(lora_run):
    _, logged = lora_run
    steps = [(step, values) for step, values in logged if "loss" in values]
    assert [step for step, _ in steps] == [1, 2]
    for _, values in steps:
        assert values["lr/unet"] == pytest.approx(1e-3) and values["lr/text_encoder"] == pytest.approx(3e-4)


def test_an_unknown_lora_save_format_fails_before_training(shapes, tmp_path):
    with pytest.raises(ValueError, match="lora_save_format='a1111': use diffusers or kohya"):
        main(flags(shapes, tmp_path / "run", lora="true", lora_save_format="a1111"))
    assert not (tmp_path / "run").exists()


def test_the_vae_trainer_logs_its_learning_rate_and_publishes_output_dir_vae(shapes, tmp_path, monkeypatch):
    logged, out = recording_logs(monkeypatch), tmp_path / "vae-run"
    train_vae(["--train_data_dir", str(shapes), "--output_dir", str(out), "--eval_count", "2",
               "--max_steps", "2", "--train_batch_size", "4", "--lr_warmup_steps", "0", "--lr_scheduler",
               "constant", "--learning_rate", "1e-3", "--log_every", "1", "--report_to", "none"])  # fmt: skip
    rates = [values["lr/vae"] for _, values in logged if "loss" in values]
    assert rates == [pytest.approx(1e-3)] * 2
    assert (out / "vae" / FINAL_MARKER).is_file() and (out / "vae" / "config.json").is_file()
