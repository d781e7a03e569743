import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from sdlite.data.dataset import DataError
from sdlite.data.shapes import write_dataset
from sdlite.training.config import ConfigError
from sdlite.training.train_vae import VAETrainConfig, latent_std, load_images, main

TINY_RUN = dict(max_steps=3, train_batch_size=8, lr_warmup_steps=1, report_to="none")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=24, seed=0, holdout=8)


def flags(**values) -> list[str]:
    """--key value command-line flags: this file tests the trainer's own argument parsing."""
    return [t for k, v in values.items() for t in (f"--{k}", str(v))]


def test_a_few_steps_save_a_vae_that_loads_with_its_measured_scaling_factor(shapes, tmp_path):
    out = tmp_path / "run"
    result = main(
        flags(train_data_dir=shapes / "train", eval_data_dir=shapes / "test", output_dir=out, **TINY_RUN)
    )
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latent_channels == 4 and vae.config.sample_size == 32
    images = load_images(shapes / "train", 32)
    std = latent_std(vae, images, seed=0)
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=1e-4)
    assert result["psnr"] > 0
    assert json.loads((out / "vae_results.json").read_text())["path"] == str(out / "vae")
    with torch.no_grad():  # scaled latents have unit variance, as the diffusion prior assumes
        z = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert (z * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)


def test_holds_out_images_of_the_training_folder_without_an_eval_folder(shapes, tmp_path):
    result = main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path, **TINY_RUN))
    assert (tmp_path / "vae" / "config.json").is_file() and result["psnr"] > 0


def test_a_resumed_run_ends_with_the_weights_of_an_unbroken_one(shapes, tmp_path):
    argv = flags(
        train_data_dir=shapes / "train", eval_count=4, checkpoint_every=2, **{**TINY_RUN, "max_steps": 4}
    )
    main(argv + flags(output_dir=tmp_path / "unbroken"))
    shutil.copytree(tmp_path / "unbroken" / "checkpoint-2", tmp_path / "resumed" / "checkpoint-2")
    main(argv + flags(output_dir=tmp_path / "resumed", resume="latest"))
    a = AutoencoderKL.from_pretrained(tmp_path / "unbroken" / "vae").state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path / "resumed" / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_then_exits_143_and_the_resumed_run_is_exact(shapes, tmp_path, monkeypatch):
    """SIGTERM in the middle of step 2 of 4: a checkpoint of step 2, exit 143; resuming ends with the
    weights of an uninterrupted run."""
    import signal

    from sdlite.training import train_vae

    argv = flags(train_data_dir=shapes / "train", eval_count=4, **{**TINY_RUN, "max_steps": 4})
    main(argv + flags(output_dir=tmp_path / "unbroken"))
    real, calls = train_vae.VAEObjective.forward, [0]

    def forward(self, x):
        calls[0] += 1
        if calls[0] == 2:
            signal.raise_signal(signal.SIGTERM)  # arrives mid-step; the loop stops after it
        return real(self, x)

    monkeypatch.setattr(train_vae.VAEObjective, "forward", forward)
    with pytest.raises(SystemExit) as stopped:
        main(argv + flags(output_dir=tmp_path / "stopped"))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert (tmp_path / "stopped" / "checkpoint-2" / "COMPLETE").is_file()
    monkeypatch.undo()
    main(argv + flags(output_dir=tmp_path / "stopped", resume="latest"))
    a = AutoencoderKL.from_pretrained(tmp_path / "unbroken" / "vae").state_dict()
    b = AutoencoderKL.from_pretrained(tmp_path / "stopped" / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_fail_at_start_up(shapes, tmp_path):
    with pytest.raises(SystemExit):  # argparse: unrecognized arguments
        main(["--max_stepz", "3"])
    with pytest.raises(ConfigError, match="max_steps"):
        main(["--max_steps", "many"])
    with pytest.raises(ValueError, match="reconstruction_loss"):
        main(
            flags(
                train_data_dir=shapes / "train",
                eval_count=4,
                output_dir=tmp_path,
                reconstruction_loss="huber",
            )
        )
    with pytest.raises(DataError, match="nowhere"):
        main(flags(train_data_dir=tmp_path / "nowhere", output_dir=tmp_path))
    assert VAETrainConfig().max_steps > 0
