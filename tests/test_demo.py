import json
import math

from PIL import Image

from sdlite.pipelines.text_to_image import TextToImagePipeline
from sdlite.training.cli import main


def test_the_whole_chain_runs_in_a_few_steps_and_makes_a_loadable_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--fast"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["stage_seconds"]) == ["data", "vae", "unet", "evaluate"]
    assert math.isfinite(results["bpd"]) and 0 <= results["fidelity"] <= 1
    assert results["fidelity_unseen"] is not None  # the demo leaves a pair out and asks for it
    pipe = TextToImagePipeline.from_pretrained(tmp_path / "model")
    assert pipe.vae.config.scaling_factor == results["vae_scaling_factor"]
    assert Image.open(tmp_path / "samples.png").size[0] >= 32
    out = capsys.readouterr().out
    assert "prompt fidelity" in out and "bits/dim" in out and "total" in out
