"""A VAE's round trip of held-out shapes read strictly: sdlite.shape_reading.vae_round_trip, and what
`sdlite evaluate` reports of it (training/cmd_evaluate.py)."""

from types import SimpleNamespace

import numpy as np
import torch
from diffusers import AutoencoderKL

from sdlite.data.shapes import draw, sample_specs
from sdlite.presets import get_preset
from sdlite.shape_reading import vae_round_trip
from training.cmd_evaluate import round_trip_figures, run_evaluation


class Codec(torch.nn.Module):
    """A stand-in VAE: the latent is the image; decoding applies ``change`` to it."""

    def __init__(self, change=lambda x: x):
        super().__init__()
        self.change, self.weight = change, torch.nn.Parameter(torch.zeros(1))

    def encode(self, x):
        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

    def decode(self, z):
        return SimpleNamespace(sample=self.change(z))

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype


def held_out(count: int = 48) -> torch.Tensor:
    pixels = np.stack([draw(s) for s in sample_specs(count, seed=4)])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_a_vae_round_trip_returns_one_uint8_image_per_input():
    vae = AutoencoderKL(**get_preset("tiny").config("vae")).eval()
    out = vae_round_trip(vae, torch.rand(3, 3, 32, 32) * 2 - 1, batch_size=2)
    assert len(out) == 3 and out[0].shape == (32, 32, 3) and out[0].dtype == np.uint8


def test_evaluate_counts_the_held_out_shapes_a_vae_gives_back_and_not_those_it_blurs(capsys):
    images = held_out()
    exact = round_trip_figures(Codec(), images)
    assert exact["vae_round_trip"] == 1.0 and exact["vae_round_trip_images"] == len(images)
    assert set(exact["vae_round_trip_by_shape"]) == {"circle", "square", "triangle"}

    def blur(x):  # a 3x3 box blur: edges soften, corners round
        return torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)

    blurred = round_trip_figures(Codec(blur), images)
    assert blurred["vae_round_trip_by_shape"]["square"] == 0.0
    assert blurred["vae_round_trip_psnr"] < exact["vae_round_trip_psnr"]
    assert "round trip read back strictly 100.0% of 48" in capsys.readouterr().out


def test_evaluate_reports_the_round_trip_and_the_strict_fidelity_beside_psnr(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    results = run_evaluation(
        str(tmp_path / "model"), n=1, steps=1, colours=["red"], shapes=["circle"], bpd_count=2,
        stride=250, bpd_draws=2,
    )  # fmt: skip
    assert 0 <= results["vae_round_trip"] <= 1 and results["vae_round_trip_images"] > 0
    assert 0 <= results["fidelity_strict"] <= results["fidelity"] <= 1
    skipped = run_evaluation(
        str(tmp_path / "model"), n=1, steps=1, colours=["red"], shapes=["circle"], bpd_count=2,
        stride=250, bpd_draws=2, round_trip=False,
    )  # fmt: skip
    assert "vae_round_trip" not in skipped
