"""LyCORIS files written from peft's adapters (sdlite.lycoris.save_lycoris): read back by our reader and
merged into the plain model's weights, each kind (LoRA, DoRA, LoHa, LoKr) gives the outputs the
peft-adapted model gives, for SD's U-Net and text encoder and SDXL's U-Net with its SGM block names.

Adapters are attached by sdlite.lora.add_lora and given random non-zero tensors, so each update does
something; alpha differs from r, so a lost scale shows.
"""

import copy

import pytest
import safetensors
import torch

from sdlite.kohya_names import LoraFileError
from sdlite.lora import LoraSettings, adapter_parameters, add_lora
from sdlite.lycoris import read_lycoris, save_lycoris
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl

KINDS = {
    "lora": dict(kind="lora"),
    "dora": dict(kind="lora", dora=True),
    "loha": dict(kind="loha"),
    "lokr": dict(kind="lokr"),
}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1")  # attention and a convolution


def _adapted(parts, settings: LoraSettings, encoders=("text_encoder",)):
    """(plain copies of the models, the models with random adapters)."""
    plain = {name: copy.deepcopy(getattr(parts, name)) for name in ("unet", *encoders)}
    torch.manual_seed(0)
    add_lora(parts.unet, parts.text_encoder if "text_encoder" in encoders else None, settings)
    with torch.no_grad():
        for name in ("unet", *encoders):
            for p in adapter_parameters(getattr(parts, name)):
                p.add_(0.2 * torch.randn_like(p))
    return plain, {name: getattr(parts, name) for name in ("unet", *encoders)}


def _merged(plain: dict, file) -> dict:
    """The plain models with each module of ``file`` merged into the weight it names."""
    merged = copy.deepcopy(plain)
    modules = read_lycoris(str(file), merged["unet"].config)
    with torch.no_grad():
        for (part, path), module in modules.items():
            layer = merged[part].get_submodule(path)
            layer.weight.copy_(module.apply(layer.weight))
    return merged, modules


def epsilon(unet, sdxl: bool = False) -> torch.Tensor:
    """ε of the U-Net on fixed random inputs (SDXL's pooled embedding and size numbers included)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, unet.config.in_channels, 16, 16, generator=g)
    text = torch.randn(2, 8, unet.config.cross_attention_dim, generator=g)
    extra = {}
    if sdxl:
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                       "time_ids": torch.rand(2, 6, generator=g)}}  # fmt: skip
    with torch.no_grad():
        return unet(x, torch.tensor([10, 500]), encoder_hidden_states=text, **extra).sample


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_written_file_read_back_and_merged_gives_the_adapted_models_outputs(kind, tmp_path):
    settings = LoraSettings(rank=4, alpha=2.0, unet_targets=UNET_TARGETS, text_encoder=True, **KINDS[kind])
    plain, adapted = _adapted(build_components("tiny", seed=0), settings)
    file = save_lycoris(tmp_path / "lycoris.safetensors", adapted, adapted["unet"].config, "tiny")
    merged, modules = _merged(plain, file)
    assert {m.kind for m in modules.values()} == {"lora" if kind == "dora" else kind}
    assert all(m.dora == (kind == "dora") for m in modules.values())
    assert {part for part, _ in modules} == {"unet", "text_encoder"}
    ours, theirs, before = epsilon(merged["unet"]), epsilon(adapted["unet"]), epsilon(plain["unet"])
    assert (theirs - before).abs().max() > 1e-2  # the adapters do something
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1000, 49407] + [49407] * 4])
    with torch.no_grad():
        te_ours, te_theirs = merged["text_encoder"](ids)[0], adapted["text_encoder"](ids)[0]
    assert torch.allclose(te_ours, te_theirs, rtol=1e-4, atol=1e-5)
    with safetensors.safe_open(file, framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_up_blocks_", "lora_unet_mid_block_",
                             "lora_te_text_model_encoder_layers_")) for k in keys)  # fmt: skip
    assert header["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_an_sdxl_file_names_the_unet_blocks_the_sgm_way_and_merges_to_the_same_outputs(kind, tmp_path):
    settings = LoraSettings(rank=2, alpha=3.0, unet_targets=UNET_TARGETS, **KINDS[kind])
    plain, adapted = _adapted(build_components_xl("tiny-sdxl", seed=0), settings, encoders=())
    file = save_lycoris(tmp_path / "xl.safetensors", adapted, adapted["unet"].config)
    with safetensors.safe_open(file, framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.") for k in keys)
    assert not any("down_blocks" in k for k in keys) and header["ss_base_model_version"] == "sdxl_base_v1-0"
    merged, _ = _merged(plain, file)
    ours, theirs = epsilon(merged["unet"], sdxl=True), epsilon(adapted["unet"], sdxl=True)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_a_lokr_of_two_full_factors_keeps_its_scale_in_w2():
    """peft scales every LoKr by alpha / r; a file whose two factors are full has no r to scale by
    (ComfyUI and our reader apply scale 1), so the scale is written into w2."""
    unet = build_components("tiny", seed=0).unet
    plain = copy.deepcopy(unet)
    add_lora(unet, None, LoraSettings(rank=8, alpha=2.0, unet_targets=("to_q",), kind="lokr"))
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert "default" in layer.lokr_w2 and "default" not in layer.lokr_w2_b  # 64 -> (8 x 8)(8 x 8): full
    with torch.no_grad():
        for p in adapter_parameters(unet):
            p.add_(0.2 * torch.randn_like(p))
    from sdlite.lycoris import peft_modules

    modules = peft_modules(unet, "unet")
    module = modules[("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")]
    assert module.rank is None
    expected = layer.get_delta_weight("default")  # peft's own update, scale included
    base = plain.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").weight
    assert torch.allclose(module.apply(base) - base, expected, atol=1e-6)


def test_writing_models_without_the_adapter_is_refused(tmp_path):
    unet = build_components("tiny", seed=0).unet
    with pytest.raises(LoraFileError, match="no adapter named 'default' in unet"):
        save_lycoris(tmp_path / "x.safetensors", {"unet": unet}, unet.config)
    assert not (tmp_path / "x.safetensors").exists()


def test_sdlite_lora_convert_takes_a_dora_to_lycoris_keys_and_back_tensor_equal(tmp_path):
    from safetensors.torch import load_file

    from pipelines import TextToImagePipeline
    from sdlite.kohya import convert_lora_file
    from sdlite.lora import save_lora

    parts = build_components("tiny", seed=0)
    settings = LoraSettings(rank=4, alpha=2.0, unet_targets=UNET_TARGETS, text_encoder=True, dora=True)
    plain, adapted = _adapted(parts, settings)
    diffusers_file = save_lora(tmp_path / "run", adapted["unet"], adapted["text_encoder"])
    kohya_file = convert_lora_file(diffusers_file, tmp_path / "dora.safetensors", to="kohya")
    merged, modules = _merged(plain, kohya_file)
    assert all(m.dora for m in modules.values())
    assert torch.allclose(epsilon(merged["unet"]), epsilon(adapted["unet"]), rtol=1e-4, atol=1e-5)
    back = convert_lora_file(kohya_file, tmp_path / "back", to="diffusers")
    original, again = load_file(diffusers_file), load_file(back)
    assert original.keys() == again.keys() and all(torch.equal(original[k], again[k]) for k in original)
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    pipe.load_lora_weights(str(back))  # diffusers' reading, magnitudes included
    assert torch.allclose(epsilon(pipe.unet), epsilon(adapted["unet"]), rtol=1e-4, atol=1e-5)
    ids = torch.tensor([[49406, 320, 1000, 49407]])
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], adapted["text_encoder"](ids)[0], atol=1e-5)
    with pytest.raises(LoraFileError, match="already in kohya's layout"):
        convert_lora_file(kohya_file, tmp_path / "again.safetensors", to="kohya")
