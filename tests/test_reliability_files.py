"""Files from strangers: no file runs code, and a bad model folder names the part and the shape.

The pickles here would create a marker file when unpickled (os.system("touch ...")); every test checks
both the clear error and that the marker was never made.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from pipelines import TextToImagePipeline
from pipelines.single_file import load_single_file
from sdlite.data.shapes import write_dataset
from sdlite.models import ModelFolderError, build_components, check_folder, load_components
from sdlite.presets import get_preset
from training.accelerator import setup_accelerator
from training.checkpoint import MARKER, CheckpointError, load_checkpoint, save_checkpoint, sha256_of
from training.optim import EMA, make_lr_schedule, make_optimizer
from training.train import main


class RunsCode:
    """Unpickling this runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def evil_pickle(path, marker, *, rewrite_checksum=True):
    """A pickle that would run code in place of a checkpoint's optimizer.pt. With ``rewrite_checksum``
    the checkpoint's mark records the new file's sha256 too, as someone who rewrote the whole folder
    would: then only the unpickling's own refusal stands between it and running."""
    torch.save({"state": {0: {"exp_avg": RunsCode(marker)}}, "param_groups": []}, path)
    mark = path.parent / MARKER
    if rewrite_checksum and mark.is_file():  # a checkpoint's file (not a loose one)
        recorded = json.loads(mark.read_text())
        recorded["sha256"][path.name] = sha256_of(path)
        mark.write_text(json.dumps(recorded))
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_components("tiny", seed=0).save_pretrained(path)
    return path


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "model")


def test_the_single_file_loader_refuses_pickles_whatever_their_name(folder, tmp_path):
    marker = tmp_path / "ran"
    for name in ("model.ckpt", "model.pt", "model.safetensors"):
        path = evil_pickle(tmp_path / name, marker)
        with pytest.raises(ValueError, match="refused|not a readable safetensors"):
            TextToImagePipeline.from_single_file(path, config="tiny")
    assert not marker.exists()


def test_a_truncated_single_file_is_a_clear_error(folder, tmp_path):
    TextToImagePipeline.from_pretrained(folder).save_single_file(tmp_path / "whole.safetensors")
    data = (tmp_path / "whole.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFolderError, match="not a readable safetensors file.*truncated"):
        load_single_file(tmp_path / "cut.safetensors", config="tiny")


def test_resuming_from_a_checkpoint_whose_pickle_would_run_code_is_refused(tmp_path):
    accelerator = setup_accelerator(tmp_path, report_to=None)
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-2)
    schedule, ema = make_lr_schedule(optimizer, "constant", 0, 10), EMA(model.parameters(), 0.9)
    path = save_checkpoint(accelerator, tmp_path, 1, {"net": model}, optimizer, schedule, ema)
    marker = tmp_path / "ran"
    evil_pickle(path / "optimizer.pt", marker, rewrite_checksum=False)
    with pytest.raises(CheckpointError, match=r"optimizer.pt.*corrupt.*sha256"):  # the checksum, first
        load_checkpoint(accelerator, path, {"net": model}, optimizer, schedule, ema)
    evil_pickle(path / "optimizer.pt", marker)
    with pytest.raises(CheckpointError, match=r"optimizer.pt.*refused.*unpickling.*could run code"):
        load_checkpoint(accelerator, path, {"net": model}, optimizer, schedule, ema)
    assert not marker.exists()


def test_train_resume_refuses_a_tampered_checkpoint(tmp_path):
    data = write_dataset(tmp_path / "data", count=4, seed=0)
    values = dict(train_data_dir=data, output_dir=tmp_path / "run", cache_dir=tmp_path / "cache",
                  max_steps=1, train_batch_size=4, checkpoint_every=1, report_to="none")  # fmt: skip
    args = [f"--{key}={value}" for key, value in values.items()]
    main(args)
    marker = tmp_path / "ran"
    evil_pickle(tmp_path / "run" / "checkpoint-1" / "optimizer.pt", marker)
    with pytest.raises(CheckpointError, match="refused"):
        main([*args, "--max_steps=2", "--resume=latest"])
    assert not marker.exists()


def test_a_model_folder_with_a_pickled_bin_that_would_run_code_is_refused(folder, tmp_path):
    model, marker = copy_of(folder, tmp_path), tmp_path / "ran"
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": RunsCode(marker)}, model / "unet" / "diffusion_pytorch_model.bin")
    for load in (load_components, TextToImagePipeline.from_pretrained):
        with pytest.raises(ModelFolderError, match=r"unet/diffusion_pytorch_model.bin.*refused"):
            load(model)
    assert not marker.exists()


def test_a_plain_pickled_bin_of_tensors_still_loads(folder, tmp_path):
    model = copy_of(folder, tmp_path)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    assert load_components(model).unet.config.in_channels == 4


@pytest.mark.parametrize(
    "part, key, value, tensor, shapes",
    [
        ("vae", "latent_channels", 8, "encoder.conv_out.weight", r"\(8, 32, 3, 3\) .* \(16, 32, 3, 3\)"),
        ("unet", "cross_attention_dim", 48, "attn2.to_k.weight", r"\(64, 64\) .* \(64, 48\)"),
        ("unet", "in_channels", 8, "conv_in.weight", r"\(32, 4, 3, 3\) .* \(32, 8, 3, 3\)"),
    ],
)
def test_weights_that_do_not_fit_the_config_name_part_tensor_and_shapes(
    folder, tmp_path, part, key, value, tensor, shapes
):
    model = copy_of(folder, tmp_path)
    config = json.loads((model / part / "config.json").read_text())
    (model / part / "config.json").write_text(json.dumps({**config, key: value}))
    for load in (load_components, TextToImagePipeline.from_pretrained):
        with pytest.raises(ModelFolderError, match=rf"{part}'.*{tensor}.*{shapes}"):
            load(model)


def test_a_text_encoder_of_another_width_is_named_with_both_widths(folder, tmp_path):
    model = copy_of(folder, tmp_path)
    shutil.rmtree(model / "text_encoder")
    config = {**get_preset("tiny").config("text_encoder"), "hidden_size": 48}
    CLIPTextModel(CLIPTextConfig(**config)).save_pretrained(model / "text_encoder")
    with pytest.raises(ModelFolderError, match="cross_attention_dim is 64 but .* width is 48"):
        load_components(model)


def test_truncated_missing_or_incomplete_weights_are_named(folder, tmp_path):
    model = copy_of(folder, tmp_path)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelFolderError, match=r"vae/diffusion_pytorch_model.safetensors' is not a readable"):
        check_folder(model)
    tensors = load_file(model / "unet" / "diffusion_pytorch_model.safetensors")
    weights.write_bytes(data)
    del tensors["conv_out.weight"], tensors["conv_out.bias"]
    save_file(tensors, model / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFolderError, match=r"lacks 2 of the unet's tensors.*conv_out.bias"):
        load_components(model)
    (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named diffusion_pytorch_model"):  # from_pretrained says
        load_components(model)
