import json
import math
import shutil

import pytest
from PIL import Image

from sdlite.models import build_components, save_components
from sdlite.training.cli import main


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A random-weight tiny model folder: enough to run every command quickly."""
    return save_components(build_components("tiny", seed=0), tmp_path_factory.mktemp("model"))


def test_generate_writes_a_grid_png_of_the_right_size(model, tmp_path):
    generate = ["generate", "a red circle", "--model", str(model), "--steps", "2"]
    assert main(generate + ["--num_images", "4", "--seed", "0", "--out", str(tmp_path / "four.png")]) == 0
    assert Image.open(tmp_path / "four.png").size == (4 * 32, 32)
    assert main(generate + ["--scale", "2", "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(tmp_path / "one.png").size == (64, 64)


def test_data_shapes_writes_an_image_folder(tmp_path):
    argv = ["data", "shapes", "--out", str(tmp_path), "--count", "12", "--exclude", "red circle"]
    assert main(argv + ["--colours", "red,blue", "--holdout", "4"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "train" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert all(Image.open(tmp_path / "train" / r["file_name"]).size == (32, 32) for r in rows)
    assert all(("red" in r["text"] or "blue" in r["text"]) and "red circle" not in r["text"] for r in rows)


def test_evaluate_rejects_a_model_folder_missing_a_part(model, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    shutil.rmtree(broken / "unet")
    assert main(["evaluate", "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "has no unet" in err and "Traceback" not in err
    assert main(["evaluate", "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_reports_fidelity_diversity_and_bits_per_dim(model, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["evaluate", "--model", str(model), "--n", "2", "--steps", "2", "--colours", "red,blue"]
    argv += ["--shapes", "circle", "--bpd_count", "4", "--stride", "250", "--json", str(out)]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["per_prompt"]) == {"a red circle", "a blue circle"}
    assert 0 <= results["fidelity"] <= 1 and results["diversity"] >= 0
    assert math.isfinite(results["bpd"]) and results["bpd"] > 0
    assert "bits/dim" in capsys.readouterr().out


def test_generate_applies_a_lora_at_its_scale(model, tmp_path):
    """--lora loads an adapter saved by sdlite; --lora_scale 0 gives the base image, 1 another one."""
    import torch

    from sdlite.lora import LoraSettings, adapter_parameters, add_lora, save_lora
    from sdlite.models import load_components

    parts = load_components(model)
    add_lora(parts.unet, parts.text_encoder, LoraSettings(rank=4))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B starts at zero (a no-op adapter): make the update visible
        for p in adapter_parameters(parts.unet):
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    save_lora(tmp_path / "lora", parts.unet)

    generate = ["generate", "a red circle", "--model", str(model), "--steps", "3", "--seed", "0"]
    assert main(generate + ["--out", str(tmp_path / "base.png")]) == 0
    for scale in ("0", "1"):
        out = str(tmp_path / f"{scale}.png")
        assert main(generate + ["--lora", str(tmp_path / "lora"), "--lora_scale", scale, "--out", out]) == 0
    pixels = {k: Image.open(tmp_path / f"{k}.png").tobytes() for k in ("base", "0", "1")}
    assert pixels["0"] == pixels["base"]
    assert pixels["1"] != pixels["base"]
