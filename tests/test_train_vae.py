import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from sdlite.data.dataset import DataError
from sdlite.data.shapes import PALETTE, shape_mask, write_dataset
from training import train_vae
from training.checkpoint import NonFiniteLossError, checkpoints
from training.config import ConfigError, VAETrainConfig, parse_config
from training.train_vae import VAEObjective, build_vae, contrast_weights, latent_std, load_images, main, psnr

TINY_RUN = dict(max_steps=3, train_batch_size=8, lr_warmup_steps=1, report_to="none")
# Measured on these 8 held-out images: the untrained VAE (seed 0) 5.2 dB, after 10 steps 11.0 dB (3
# steps: 8.8, 20: 12.7). A VAE that learned nothing stays at its start; 4 dB is 2/3 of the gain.
LEARNED_DB = 4.0


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=24, seed=0, holdout=8)


def flags(**values) -> list[str]:
    """--key value command-line flags: this file tests the trainer's own argument parsing."""
    return [t for k, v in values.items() for t in (f"--{k}", str(v))]


def test_ten_steps_save_a_vae_that_reconstructs_better_and_loads_with_its_measured_scaling_factor(
    shapes, tmp_path
):
    out = tmp_path / "run"
    result = main(flags(train_data_dir=shapes / "train", eval_data_dir=shapes / "test", output_dir=out,
                        **{**TINY_RUN, "max_steps": 10}))  # fmt: skip
    vae = AutoencoderKL.from_pretrained(out / "vae")
    assert vae.config.latent_channels == 4 and vae.config.sample_size == 32
    held_out = load_images(shapes / "test", 32)
    torch.manual_seed(0)  # the run's initial weights (seed 0)
    untrained = build_vae(VAETrainConfig())[0].eval()
    assert result["psnr"] == pytest.approx(psnr(vae, held_out))  # the figure is of the saved weights
    assert result["psnr"] > psnr(untrained, held_out) + LEARNED_DB
    images = load_images(shapes / "train", 32)
    std = latent_std(vae, images, seed=0)
    assert vae.config.scaling_factor == pytest.approx(1 / std, rel=1e-4)
    assert json.loads((out / "vae_results.json").read_text())["path"] == str(out / "vae")
    with torch.no_grad():  # scaled latents have unit variance, as the diffusion prior assumes
        z = vae.encode(images).latent_dist.sample(torch.Generator().manual_seed(0))
    assert (z * vae.config.scaling_factor).std().item() == pytest.approx(1.0, rel=1e-3)


def test_holds_out_the_first_images_of_the_training_folder_without_an_eval_folder(shapes, tmp_path):
    result = main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path, **TINY_RUN))
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    first = load_images(shapes / "train", 32)[:4]
    assert result["psnr"] == pytest.approx(psnr(vae, first))


def test_the_shape_keys_build_a_narrower_vae_without_middle_attention_that_saves_and_loads(shapes, tmp_path):
    main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path, **TINY_RUN,
               vae_block_out_channels="16,16,32", vae_mid_block_attention="false"))  # fmt: skip
    vae = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert list(vae.config.block_out_channels) == [16, 16, 32]
    assert [b.conv2.out_channels for b in vae.encoder.down_blocks[1].resnets] == [16]
    assert [list(part.mid_block.attentions) for part in (vae.encoder, vae.decoder)] == [[None], [None]]


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


def nan_on_call(monkeypatch, call: int) -> None:
    """Make the VAE's loss NaN on the given call of its forward (= step, counted from 1)."""
    real, calls = train_vae.VAEObjective.forward, [0]

    def forward(self, x):
        calls[0] += 1
        loss, rec, kl = real(self, x)
        return (loss * float("nan") if calls[0] == call else loss), rec, kl

    monkeypatch.setattr(train_vae.VAEObjective, "forward", forward)


def test_a_nan_step_is_skipped_without_touching_weights_or_optimizer(shapes, tmp_path, monkeypatch, capsys):
    nan_on_call(monkeypatch, 2)
    main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path, checkpoint_every=1,
               **TINY_RUN))  # fmt: skip
    assert "1 step(s) of step 2 had a NaN or inf loss" in capsys.readouterr().out
    weights = AutoencoderKL.from_pretrained(tmp_path / "vae").state_dict()
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the fused AdamW kernel skipped the step on the device: 2 updates in 3 steps
    optimizer = torch.load(tmp_path / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {2.0}


def test_nonfinite_loss_stop_stops_before_the_next_checkpoint(shapes, tmp_path, monkeypatch):
    nan_on_call(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"of step 2 had.*checkpoint-1"):
        main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path, checkpoint_every=1,
                   nonfinite_loss="stop", **TINY_RUN))  # fmt: skip
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1"]
    assert not (tmp_path / "vae").exists()


def test_a_diffusers_flag_reads_as_ours_or_fails_naming_why(capsys):
    assert parse_config(VAETrainConfig, ["--max_train_steps", "10"]).optimizer.max_steps == 10
    assert "--max_train_steps -> --max_steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--pretrained_model_name_or_path", "runs/sd"])
    assert "trains the --preset's VAE from random weights" in capsys.readouterr().err


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
    for widths, error in [
        ("16,32", r"preset 'tiny' has 3 levels, give 3 widths"),
        ("16,20,32", r"positive multiple of 8 \(the GroupNorm groups\)"),
        ("8,16,32", "at least 16: at 8 wide each of the 8 GroupNorm groups holds one channel"),
    ]:
        with pytest.raises(ValueError, match=f"vae_block_out_channels .*{error}"):
            main(flags(train_data_dir=shapes / "train", eval_count=4, output_dir=tmp_path,
                       vae_block_out_channels=widths))  # fmt: skip


def square_image(colour: str = "red", box=(10, 10, 20, 20)) -> torch.Tensor:
    """(1, 3, 32, 32) in [-1, 1]: a square of a palette colour in ``box`` on the white background."""
    image = torch.ones(1, 3, 32, 32)
    mask = torch.from_numpy(shape_mask("square", box, (32, 32)))
    image[0][:, mask] = torch.tensor(PALETTE[colour], dtype=torch.float32)[:, None] / 127.5 - 1
    return image


def test_contrast_weights_are_one_on_flat_colour_and_highest_on_a_corner_of_any_colour():
    weights = contrast_weights(square_image(), 20.0)[0, 0]
    assert weights.shape == (32, 32)
    for flat in (weights[0, 0], weights[15, 15], weights[31, 31]):  # background, inside, the border
        assert flat.item() == pytest.approx(1.0, abs=1e-5)
    # red (220, 40, 40) on white: its largest channel difference is 215 of 127.5 a unit; |x - box3(x)| is
    # that times the share of the 9 neighbours that differ: 5 at a corner, 3 on an edge
    corner, edge = weights[10, 10].item(), weights[10, 15].item()
    assert corner == pytest.approx(1 + 20 * 215 / 127.5 * 5 / 9, rel=1e-5)
    assert edge == pytest.approx(1 + 20 * 215 / 127.5 * 3 / 9, rel=1e-5)
    # yellow (235, 215, 40) is near white in two channels: its corner weighs as red's
    assert contrast_weights(square_image("yellow"), 20.0)[0, 0, 10, 10].item() == pytest.approx(corner)
    # a square in the image's corner: outside is the background, so its corner pixel is a corner
    assert contrast_weights(square_image(box=(0, 0, 10, 10)), 20.0)[0, 0, 0, 0].item() == pytest.approx(
        corner
    )
    assert contrast_weights(square_image(), 0.0).eq(1).all()


def test_the_edge_weighted_reconstruction_is_the_mean_of_the_errors_weighted_by_contrast():
    torch.manual_seed(0)
    vae = build_vae(VAETrainConfig())[0]
    x = square_image()
    plain, weighted = VAEObjective(vae, kl_weight=0.0), VAEObjective(vae, kl_weight=0.0, edge_weight=20.0)
    torch.manual_seed(1)
    _, rec_plain, _ = plain(x)
    torch.manual_seed(1)  # the same z ~ q(z|x)
    _, rec_weighted, _ = weighted(x)
    torch.manual_seed(1)
    with torch.no_grad():
        reconstruction = vae.decode(vae.encode(x).latent_dist.sample()).sample
    errors = (reconstruction - x) ** 2
    weights = contrast_weights(x, 20.0).expand_as(errors)
    assert rec_plain.item() == pytest.approx(errors.mean().item(), rel=1e-5)
    assert rec_weighted.item() == pytest.approx(
        (weights * errors).sum().item() / weights.sum().item(), rel=1e-5
    )
    assert rec_weighted.item() != pytest.approx(rec_plain.item(), rel=1e-3)
    with pytest.raises(ValueError, match="edge_weight"):
        VAEObjective(vae, edge_weight=-1.0)
