"""SDXL LoRA files in the layout sd-scripts writes: the U-Net's blocks named the original (SGM) way
(``lora_unet_input_blocks_3_1_...``), ``lora_te1_`` / ``lora_te2_``, each module's true alpha; written
by ``sdlite lora convert`` and ``save_lora``, read by ours and by diffusers with the same effect.

The adapter is on the tiny SDXL preset's U-Net and both encoders, rank 2 and alpha 4 (scale 2), with
random B (peft starts it at zero, which would make every comparison pass trivially).
"""

import json

import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import StableDiffusionXLPipeline
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from pipelines import TextToImageXLPipeline
from sdlite import kohya
from sdlite.kohya import LoraFileError, convert_lora_file, read_modules
from sdlite.lora import LoraSettings
from sdlite.lora_command import main
from sdlite.models_xl import build_components_xl
from sdlite.presets import PRESETS

TINY_UNET = PRESETS["tiny-sdxl"].unet
PARTS = ("unet", "text_encoder", "text_encoder_2")


def _adapt(parts):
    settings = LoraSettings(rank=2, alpha=4.0)
    inject_adapter_in_model(settings.config(settings.unet_targets), parts.unet)
    for name in PARTS[1:]:
        inject_adapter_in_model(settings.config(settings.text_encoder_targets), getattr(parts, name))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in PARTS:
            for key, p in getattr(parts, name).named_parameters():
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(diffusers-layout SDXL file with each part's LoraConfig in its header, its kohya conversion)."""
    parts = build_components_xl("tiny-sdxl", seed=1)
    _adapt(parts)
    layers, metadata = {}, {}
    for name in PARTS:
        model = getattr(parts, name)
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(model)
        config = model.peft_config["default"].to_dict()
        metadata[f"{name}_lora_adapter_metadata"] = json.loads(json.dumps(config, default=sorted))
    folder = tmp_path_factory.mktemp("sdxl-lora")
    StableDiffusionXLPipeline.save_lora_weights(folder, **layers, **metadata, safe_serialization=True)
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    kohya_file = convert_lora_file(diffusers_file, folder / "kohya.safetensors", unet_config=TINY_UNET)
    return diffusers_file, kohya_file


def test_sdxl_kohya_file_names_sgm_blocks_te1_te2_and_the_true_alpha(files):
    tensors = safetensors.torch.load_file(files[1])
    modules = {k.split(".")[0] for k in tensors}
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and all(m.split("_")[2] in ("input", "middle", "output") for m in unet)
    # tiny-sdxl has one ResNet a level: level 1's first attention block is input_blocks.3
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in unet
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}
    with safetensors.safe_open(files[1], framework="pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"


def test_sdxl_lora_to_kohya_and_back_gives_the_same_tensors(files, tmp_path):
    back = convert_lora_file(files[1], tmp_path / "back", to="diffusers", unet_config=TINY_UNET)
    start, end = read_modules(files[0])[0], read_modules(back)[0]
    assert start.keys() == end.keys() and len(start) > 40
    for key, m in start.items():
        assert torch.equal(end[key].down, m.down) and torch.equal(end[key].up, m.up), key
        assert end[key].alpha == m.alpha == 4.0


def _outputs(pipe) -> list[torch.Tensor]:
    """The U-Net's ε and both encoders' hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 16), generator=g)
    latents, width = torch.randn(2, 4, 8, 8, generator=g), TINY_UNET["cross_attention_dim"]
    text = torch.randn(2, 16, width, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}
    with torch.no_grad():
        eps = pipe.unet(latents, 500, text, added_cond_kwargs=added).sample
        states = [pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder_2(ids).last_hidden_state]
    return [eps, *states]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rel: float = 1e-4) -> bool:
    return all(((x - y).norm() / y.norm()).item() <= rel for x, y in zip(a, b))


def _pipe(cls):
    parts = build_components_xl("tiny-sdxl", seed=0).as_dict()
    return cls(**parts, add_watermarker=False) if cls is StableDiffusionXLPipeline else cls(**parts)


def test_diffusers_and_ours_read_our_sdxl_kohya_file_as_the_diffusers_file(files):
    base = _outputs(_pipe(TextToImageXLPipeline))
    reference = _pipe(StableDiffusionXLPipeline)
    reference.load_lora_weights(str(files[0]))
    expected = _outputs(reference)
    assert all((x - y).abs().max() > 1e-3 for x, y in zip(expected, base))  # the LoRA does something
    for cls in (StableDiffusionXLPipeline, TextToImageXLPipeline):
        pipe = _pipe(cls)
        pipe.load_lora_weights(str(files[1]))
        assert _close(_outputs(pipe), expected), cls.__name__


def _by_hand() -> tuple[dict, dict]:
    """An sd-scripts-style SGM file for tiny-sdxl, written from the block rules by hand, and
    {(part, diffusers module): (down, up, alpha)} where each of its modules must land."""
    g = torch.Generator().manual_seed(3)
    rows = [  # kohya name, part, diffusers module, (in, out), kernel, alpha
        ("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", "unet",
         "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", (96, 64), None, 1.0),
        ("lora_unet_middle_block_1_proj_out", "unet", "mid_block.attentions.0.proj_out", (128, 128),
         None, 8.0),
        ("lora_unet_output_blocks_1_1_transformer_blocks_0_ff_net_2", "unet",
         "up_blocks.0.attentions.1.transformer_blocks.0.ff.net.2", (512, 128), None, 2.0),
        ("lora_unet_input_blocks_1_0_in_layers_2", "unet", "down_blocks.0.resnets.0.conv1", (32, 32), 3, 2.0),
        ("lora_unet_output_blocks_4_0_emb_layers_1", "unet", "up_blocks.2.resnets.0.time_emb_proj",
         (128, 32), None, 4.0),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
         "encoder.layers.0.self_attn.q_proj", (32, 32), None, 1.0),
        ("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", "text_encoder_2",
         "text_model.encoder.layers.1.self_attn.out_proj", (64, 64), None, 1.0),
        ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "text_encoder_2",
         "text_model.encoder.layers.1.mlp.fc2", (256, 64), None, 3.0),
    ]  # fmt: skip
    tensors, expected = {}, {}
    for name, part, module, (width_in, width_out), kernel, alpha in rows:
        down_shape = (4, width_in, kernel, kernel) if kernel else (4, width_in)
        down = 0.2 * torch.randn(down_shape, generator=g)
        up = 0.2 * torch.randn((width_out, 4, 1, 1) if kernel else (width_out, 4), generator=g)
        tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                    f"{name}.alpha": torch.tensor(alpha)}  # fmt: skip
        expected[(part, module)] = (down, up, alpha)
    return tensors, expected


def test_a_hand_built_sd_scripts_sgm_file_loads_in_ours_with_the_expected_effect(tmp_path):
    tensors, expected = _by_hand()
    file = tmp_path / "sd-scripts.safetensors"
    safetensors.torch.save_file(tensors, file)
    pipe = _pipe(TextToImageXLPipeline)
    pipe.load_lora_weights(str(file))
    by_hand = _pipe(TextToImageXLPipeline)  # W + (alpha / r) up @ down, module by module
    with torch.no_grad():
        for (part, module), (down, up, alpha) in expected.items():
            weight = getattr(by_hand, part).get_submodule(module).weight
            weight += (alpha / 4) * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    assert _close(_outputs(pipe), _outputs(by_hand))
    assert not _close(_outputs(pipe), _outputs(_pipe(TextToImageXLPipeline)), rel=1e-3)


def test_sgm_names_follow_the_unet_shape_and_misfits_name_the_model_to_pass(files, tmp_path, capsys):
    tensors, _ = _by_hand()
    on_tiny = kohya.modules_from_kohya(tensors, TINY_UNET)
    assert ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") in on_tiny
    with pytest.raises(LoraFileError, match=r"SDXL 1.0.s U-Net.*--model"):
        kohya.modules_from_kohya(tensors)  # SDXL 1.0 is wider, with two ResNets a level
    out = tmp_path / "k.safetensors"
    assert main([str(files[0]), str(out), "--to", "kohya"]) == 2  # no --model: SDXL 1.0's, too wide
    assert "pass the model it was trained on (--model" in capsys.readouterr().err and not out.exists()
    assert main([str(files[0]), str(out), "--to", "kohya", "--model", "tiny-sdxl"]) == 0
    assert safetensors.torch.load_file(out).keys() == safetensors.torch.load_file(files[1]).keys()
    assert main([str(files[0]), str(out), "--to", "kohya", "--model", "nowhere", "--overwrite"]) == 2
    assert "neither a preset name nor a model folder" in capsys.readouterr().err
