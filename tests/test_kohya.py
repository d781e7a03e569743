"""LoRA files in kohya's layout (A1111, ComfyUI): written with each module's true alpha, read back,
loaded by diffusers' and our pipeline at the strength trained, and bad files refused by name.

The adapter has rank 8 and alpha 4 (scale 0.5) with random A and B (peft starts B at zero, which
would make every comparison pass trivially), on the U-Net and the text encoder.
"""

import copy
import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionPipeline
from diffusers.loaders import StableDiffusionLoraLoaderMixin

from pipelines import TextToImagePipeline
from pipelines.adapters import kohya_lora_state
from sdlite import kohya
from sdlite.ddpm import DDPMScheduler
from sdlite.kohya import LoraFileError, convert_lora_file, read_modules
from sdlite.lora import LoraSettings, adapter_parameters, add_lora, read_lora_metadata, save_lora
from sdlite.lora_command import main
from sdlite.models import build_components

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
TO_K = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TE_Q = "encoder.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base():
    # steps_offset 1 in the scheduler, which diffusers' StableDiffusionPipeline insists on, so that
    # both pipelines run the same timesteps
    parts = build_components("tiny", seed=0)
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    return dataclasses.replace(parts, scheduler=DDPMScheduler.from_config(config | {"steps_offset": 1}))


@pytest.fixture(scope="module")
def adapted(base):
    parts = copy.deepcopy(base)
    add_lora(parts.unet, parts.text_encoder, LoraSettings(rank=8, alpha=4.0, text_encoder=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for model in (parts.unet, parts.text_encoder):
            for p in adapter_parameters(model):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return parts


@pytest.fixture(scope="module")
def files(adapted, tmp_path_factory):
    """(diffusers-layout file, its kohya conversion)."""
    folder = tmp_path_factory.mktemp("lora")
    diffusers_file = save_lora(folder / "diffusers", adapted.unet, adapted.text_encoder, base_model="tiny")
    return diffusers_file, convert_lora_file(diffusers_file, folder / "kohya.safetensors", to="kohya")


def _ours(parts):
    pipe = TextToImagePipeline(**copy.deepcopy(parts).as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers(parts):
    pipe = StableDiffusionPipeline(
        **copy.deepcopy(parts).as_dict(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, lora=None):
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="a")
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, guidance_scale=3.0,
        output_type="np", generator=generator,
    ).images  # fmt: skip


def _scaling(pipe, part, module):
    return dict(getattr(pipe, part).named_modules())[module].scaling["a"]


def _save(tensors, file, metadata=None):
    safetensors.torch.save_file(tensors, file, metadata=metadata)
    return file


def test_kohya_file_has_kohya_names_and_each_modules_true_alpha(files):
    diffusers_file, kohya_file = files
    source, kohya_state = safetensors.torch.load_file(diffusers_file), safetensors.torch.load_file(kohya_file)
    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert torch.equal(kohya_state[f"{name}.lora_down.weight"], source[f"unet.{TO_Q}.lora_A.weight"])
    assert torch.equal(kohya_state[f"{name}.lora_up.weight"], source[f"unet.{TO_Q}.lora_B.weight"])
    assert torch.equal(kohya_state[f"{te}.lora_up.weight"], source[f"text_encoder.{TE_Q}.lora_B.weight"])
    alphas = {k: v.item() for k, v in kohya_state.items() if k.endswith(".alpha")}
    assert len(alphas) == len(source) // 2 and set(alphas.values()) == {4.0}  # not the rank, 8
    with safetensors.safe_open(kohya_file, framework="pt") as f:
        header = f.metadata()
    assert "lora_adapter_metadata" not in header  # diffusers refuses alphas beside it
    assert header["ss_network_dim"] == "8" and header["ss_network_alpha"] == "4.0"


def test_kohya_file_gives_diffusers_the_images_of_the_diffusers_file_and_ours(base, adapted, files, tmp_path):
    diffusers_file, kohya_file = files
    from_diffusers_file = _images(_diffusers(base), diffusers_file)
    from_kohya_file = _images(_diffusers(base), kohya_file)
    in_process = _images(_ours(adapted))
    plain = _images(_diffusers(base))
    assert np.abs(from_diffusers_file - plain).max() > 1e-2, "the adapter changed nothing"
    assert np.abs(from_kohya_file - from_diffusers_file).max() <= 1e-4
    assert np.abs(from_kohya_file - in_process).max() <= 1e-4

    # what alpha = rank (diffusers' own converter) would give instead: the test can tell them apart
    state = safetensors.torch.load_file(kohya_file)
    wrong = {k: torch.tensor(8.0) if k.endswith(".alpha") else v for k, v in state.items()}
    wrong_images = _images(_diffusers(base), _save(wrong, tmp_path / "alpha_is_rank.safetensors"))
    assert np.abs(wrong_images - from_diffusers_file).max() > 1e-2


def test_kohya_file_loads_in_our_pipeline_at_the_trained_strength(base, adapted, files):
    pipe = _ours(base)
    images = _images(pipe, files[1])
    assert _scaling(pipe, "unet", TO_Q) == 0.5 and _scaling(pipe, "text_encoder", TE_Q) == 0.5
    assert np.abs(images - _images(_ours(adapted))).max() <= 1e-4


def _mixed(kohya_file, tmp_path):
    """The kohya file with one U-Net module at alpha 16, one of rank 2, and a text-encoder module at
    alpha 1: what resized or extracted LoRAs look like."""
    state = safetensors.torch.load_file(kohya_file)
    k = "lora_unet_" + TO_K.replace(".", "_")
    state[k + ".alpha"] = torch.tensor(16.0)
    q = "lora_unet_" + TO_Q.replace(".", "_")
    state[q + ".lora_down.weight"] = state[q + ".lora_down.weight"][:2].clone()
    state[q + ".lora_up.weight"] = state[q + ".lora_up.weight"][:, :2].clone()
    state[q + ".alpha"] = torch.tensor(3.0)
    state["lora_te_text_model_" + TE_Q.replace(".", "_") + ".alpha"] = torch.tensor(1.0)
    return _save(state, tmp_path / "mixed.safetensors")


def test_round_trips_are_tensor_equal_with_per_module_ranks_and_alphas(files, tmp_path):
    diffusers_file, kohya_file = files
    for start in (kohya_file, _mixed(kohya_file, tmp_path)):
        there = convert_lora_file(start, tmp_path / "there", to="diffusers", overwrite=True)
        back = convert_lora_file(there, tmp_path / "back.safetensors", to="kohya", overwrite=True)
        a, b = safetensors.torch.load_file(start), safetensors.torch.load_file(back)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    kohya_again = tmp_path / "again.safetensors"
    again = convert_lora_file(
        convert_lora_file(diffusers_file, kohya_again, to="kohya"), tmp_path, to="diffusers"
    )
    a, b = safetensors.torch.load_file(diffusers_file), safetensors.torch.load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        read_lora_metadata(again)["unet"]["alpha"] == 4.0
        and read_lora_metadata(again)["base_model"] == "tiny"
    )


def test_per_module_alphas_load_right_through_sdlite_where_diffusers_loses_them(base, files, tmp_path):
    mixed = _mixed(files[1], tmp_path)
    expected = {
        ("unet", TO_K): 2.0,
        ("unet", TO_Q): 1.5,
        ("text_encoder", TE_Q): 0.125,
        ("unet", TO_Q[:-1] + "v"): 0.5,
    }

    converted = convert_lora_file(mixed, tmp_path / "converted", to="diffusers")
    for make in (_ours, _diffusers):
        pipe = make(base)
        pipe.load_lora_weights(str(converted), adapter_name="a")
        assert {key: _scaling(pipe, *key) for key in expected} == expected
        assert dict(pipe.unet.named_modules())[TO_Q].r["a"] == 2

    # what a pipeline's lora_state_dict gets from kohya_lora_state, through diffusers' own loaders
    pipe = _ours(base)
    state, metadata = kohya_lora_state(str(mixed))
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(
        state, None, pipe.unet, adapter_name="a", metadata=metadata
    )
    StableDiffusionLoraLoaderMixin.load_lora_into_text_encoder(
        state, None, pipe.text_encoder, adapter_name="a", metadata=metadata
    )
    assert {key: _scaling(pipe, *key) for key in expected} == expected

    # diffusers' own reading of the kohya file gives every module of a part the commonest alpha
    pipe = _diffusers(base)
    pipe.load_lora_weights(str(mixed), adapter_name="a")
    assert _scaling(pipe, "unet", TO_K) == 0.5 and _scaling(pipe, "text_encoder", TE_Q) == 0.5
    assert kohya_lora_state(str(files[0])) is None  # a diffusers-layout file is left to diffusers


def test_our_pipeline_loads_a_kohya_file_with_each_modules_own_alpha(base, files, tmp_path):
    mixed = _mixed(files[1], tmp_path)
    pipe = _ours(base)
    pipe.load_lora_weights(str(mixed), adapter_name="a")
    assert _scaling(pipe, "unet", TO_K) == 2.0 and _scaling(pipe, "unet", TO_Q) == 1.5
    assert _scaling(pipe, "text_encoder", TE_Q) == 0.125 and _scaling(pipe, "unet", TO_Q[:-1] + "v") == 0.5


def test_our_pipeline_refuses_a_pickled_lora(base, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save({"unet.x.lora_A.weight": torch.zeros(1)}, folder / "pytorch_lora_weights.bin")
    for source in (folder, folder / "pytorch_lora_weights.bin"):
        with pytest.raises(ValueError, match="is a pickle .pytorch_lora_weights.bin.: refused"):
            _ours(base).load_lora_weights(str(source))


def test_rslora_adapter_gets_the_alpha_of_its_scale(files, tmp_path):
    tensors, header = kohya.load_lora_file(files[0])
    configs = json.loads(header["lora_adapter_metadata"]) | {"unet.use_rslora": True}
    rs = _save(tensors, tmp_path / "rs.safetensors", header | {"lora_adapter_metadata": json.dumps(configs)})
    modules, layout, _ = read_modules(rs)
    assert layout == "diffusers"
    assert modules[("unet", TO_Q)].alpha == pytest.approx(4.0 * math.sqrt(8))  # alpha / sqrt(r) = alpha' / r
    assert modules[("text_encoder", TE_Q)].alpha == 4.0


def test_sdxl_files_name_te1_te2_and_the_unets_sgm_blocks_and_read_back():
    def module(rank, alpha, width_in=6, width_out=5):
        return kohya.LoraModule(torch.randn(rank, width_in), torch.randn(width_out, rank), alpha)

    modules = {  # SDXL 1.0's middle block is 1280 wide
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0"): module(4, 2.0, 1280, 1280),
        ("text_encoder", TE_Q): module(4, 2.0),
        ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc1"): module(2, 1.0),
    }
    tensors, _ = kohya.to_kohya(modules)
    assert {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_up.weight")} == {
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    }
    back = kohya.modules_from_kohya(tensors)
    assert back.keys() == modules.keys()
    assert all(torch.equal(back[k].up, m.up) and back[k].alpha == m.alpha for k, m in modules.items())


def test_pickles_and_non_safetensors_files_are_refused(tmp_path):
    state = {"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}
    for name in ("lora.bin", "lora.safetensors"):  # also when it is named like a safetensors file
        torch.save(state, tmp_path / name)
        with pytest.raises(LoraFileError, match="is a pickle.*refused"):
            convert_lora_file(tmp_path / name, tmp_path / "out.safetensors", to="kohya")
    with pytest.raises(LoraFileError, match="is a pickle"):  # what a pipeline's loading would go through
        kohya_lora_state(str(tmp_path / "lora.safetensors"))
    (tmp_path / "text.safetensors").write_text("not a tensor file at all")
    with pytest.raises(LoraFileError, match="not a safetensors file"):
        convert_lora_file(tmp_path / "text.safetensors", tmp_path / "out.safetensors", to="kohya")
    assert not (tmp_path / "out.safetensors").exists()


def test_unknown_layout_names_the_keys_found_and_those_expected(tmp_path):
    file = _save(
        {"model.diffusion_model.input_blocks.0.weight": torch.zeros(2)}, tmp_path / "model.safetensors"
    )
    with pytest.raises(LoraFileError) as e:
        convert_lora_file(file, tmp_path / "out.safetensors", to="kohya")
    assert "model.diffusion_model.input_blocks.0.weight" in str(e.value)
    assert "lora_A.weight" in str(e.value) and "lora_down.weight" in str(e.value)


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)},
         r"shapes do not match: A \(down\) \(4, 8\), B \(up\) \(8, 2\)"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
         "has A \\(down\\) but not its partner"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(4, 8)}, "not plain LoRA"),
        ({"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(8, 4)}, "SGM.* no such module"),
        ({"lora_unet_down_blocks_0_mystery_layer.lora_down.weight": torch.zeros(4, 8),
          "lora_unet_down_blocks_0_mystery_layer.lora_up.weight": torch.zeros(8, 4)},
         r"cannot tell .* \['mystery', 'layer'\]"),
        ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 8),
          "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(8, 3)}, "shapes do not match"),
    ],
    ids=["rank-mismatch", "missing-up", "lycoris", "sgm-name-sdxl-lacks", "unknown-module",
         "diffusers-mismatch"],
)  # fmt: skip
def test_broken_lora_files_are_refused_by_name(tmp_path, tensors, message):
    file = _save(tensors, tmp_path / "bad.safetensors")
    to = "kohya" if next(iter(tensors)).startswith("unet.") else "diffusers"
    with pytest.raises(LoraFileError, match=message):
        convert_lora_file(file, tmp_path / "out.safetensors", to=to)
    assert not (tmp_path / "out.safetensors").exists()


def test_sdlite_lora_convert_converts_and_refuses_overwriting_or_a_file_already_in_the_layout(
    files, tmp_path, capsys
):
    from sdlite.cli import main as sdlite

    out = tmp_path / "out.safetensors"
    assert sdlite(["lora", "convert", str(files[0].parent), str(out), "--to", "kohya"]) == 0
    assert read_modules(out)[1] == "kohya"
    assert sdlite(["lora", "convert", str(files[0]), str(out), "--to", "kohya"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main([str(files[1]), str(tmp_path / "again.safetensors"), "--to", "kohya"]) == 2
    assert "already in kohya's layout" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sdlite(["lora", "convert", str(files[0]), str(out), "--t", "kohya"])  # no abbreviations


def test_command_help_imports_no_torch():
    code = (
        "import sys; from sdlite.lora_command import build_parser; build_parser().format_help(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_save_lora_kohya_format_writes_both_layouts(adapted, files, tmp_path):
    kohya_file = save_lora(tmp_path, adapted.unet, adapted.text_encoder, format="kohya")
    assert (
        kohya_file == tmp_path / "lora_kohya.safetensors"
        and (tmp_path / "pytorch_lora_weights.safetensors").exists()
    )
    a, b = safetensors.torch.load_file(kohya_file), safetensors.torch.load_file(files[1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="unknown LoRA file format 'a1111'"):
        save_lora(tmp_path / "other", adapted.unet, format="a1111")
    assert not (tmp_path / "other").exists()
