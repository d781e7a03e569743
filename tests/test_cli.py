import json
import math
import shutil

import pytest
from PIL import Image

from sdlite.models import build_components, save_components
from training.cli import main


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
