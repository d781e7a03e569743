"""LoRA adapters: what sdlite saves, diffusers' pipelines load and apply at the strength trained.

Every adapter here has random A and B (peft starts B at zero, which would make each check pass
trivially). References are built two ways: the peft-wrapped model used in-process, and the merged
weight ``W + w * (alpha / r) * B @ A`` computed by hand from the file, independent of peft.
"""

import copy
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import yaml
from diffusers import StableDiffusionPipeline

from pipelines import TextToImagePipeline
from sdlite.lora import (
    LoraSettings,
    adapter_parameters,
    adapter_scale,
    add_lora,
    cast_adapters_to_fp32,
    load_lora_into,
    lora_param_groups,
    read_lora_metadata,
    save_lora,
)
from sdlite.models import build_components
from sdlite.presets import get_preset


@pytest.fixture(scope="module")
def base():
    return build_components("tiny", seed=0)


@pytest.fixture
def parts(base):
    return copy.deepcopy(base)


def _randomise(model, adapter_name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model, adapter_name):
            p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _adapted(base, settings, seed=0):
    """A copy of ``base`` with a random adapter named "default"."""
    parts = copy.deepcopy(base)
    add_lora(parts.unet, parts.text_encoder, settings)
    _randomise(parts.unet, seed=seed)
    _randomise(parts.text_encoder, seed=seed + 1)
    return parts


def _pipe(parts):
    pipe = TextToImagePipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_pipe(parts):
    """diffusers' pipeline over the same parts (the presets' scheduler config is one it keeps as is)."""
    pipe = StableDiffusionPipeline(
        **parts.as_dict(), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, **kwargs):
    generator = torch.Generator().manual_seed(0)
    out = pipe(
        "a red circle",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="np",
        generator=generator,
        **kwargs,
    )
    return out.images


def _base_weights(unet, text_encoder):
    """Copies of every weight but the adapters' (peft renames a wrapped one ``base_layer.weight``)."""
    models = {"unet": unet, "text_encoder": text_encoder}
    return {
        f"{part}.{k}": v.detach().clone()
        for part, model in models.items()
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }


def _unet_out(unet):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 16, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 500]), text).sample


def _merged_unet(unet, files_and_weights):
    """``unet`` with ``W += w * (alpha / r) * B @ A`` for each adapter file: the update LoRA defines."""
    merged = copy.deepcopy(unet)
    modules = dict(merged.named_modules())
    for path, weight in files_and_weights:
        info = read_lora_metadata(path)["unet"]
        state = safetensors.torch.load_file(path / "pytorch_lora_weights.safetensors")
        for key, A in state.items():
            if key.startswith("unet.") and key.endswith(".lora_A.weight"):
                name = key.removeprefix("unet.").removesuffix(".lora_A.weight")
                B = state[f"unet.{name}.lora_B.weight"]
                with torch.no_grad():
                    modules[name].weight += weight * info["alpha"] / info["rank"] * (B @ A)
    return merged


def test_saved_adapter_loads_in_diffusers_and_matches_in_process(base, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4))
    save_lora(tmp_path, adapted.unet)
    in_process = _images(_pipe(adapted))

    pipe = _pipe(copy.deepcopy(base))
    before = _images(pipe)
    pipe.load_lora_weights(tmp_path, adapter_name="shapes")
    loaded = _images(pipe)

    assert np.abs(loaded - before).max() > 1e-3, "the adapter changed nothing"
    assert np.abs(loaded - in_process).max() <= 1e-5


@pytest.mark.parametrize("scale", [None, 0.5], ids=["as-loaded", "scale-0.5"])
def test_our_pipeline_and_diffusers_give_the_same_images_with_the_same_adapter(base, tmp_path, scale):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    kw = {} if scale is None else {"cross_attention_kwargs": {"scale": scale}}
    images = []
    for make in (_pipe, _diffusers_pipe):
        pipe = make(copy.deepcopy(base))
        pipe.load_lora_weights(tmp_path, adapter_name="a")
        images.append(_images(pipe, guidance_scale=3.0, **kw))
    plain = _images(_pipe(copy.deepcopy(base)), guidance_scale=3.0)
    assert np.abs(images[0] - plain).max() > 1e-3, "the adapter changed nothing"
    assert np.abs(images[0] - images[1]).max() <= 1e-5


def test_alpha_other_than_rank_round_trips_and_scales_the_update(base, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=16.0))  # scale alpha / r = 4
    save_lora(tmp_path, adapted.unet, base_model="presets/tiny")
    assert read_lora_metadata(tmp_path) == {
        "base_model": "presets/tiny",
        "unet": {"rank": 4, "alpha": 16.0, "targets": ["to_k", "to_out.0", "to_q", "to_v"]},
    }

    pipe = _pipe(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.scaling["a"] == 4.0
    expected = _unet_out(_merged_unet(base.unet, [(tmp_path, 1.0)]))
    assert (_unet_out(pipe.unet) - expected).abs().max() <= 1e-5


def test_fuse_then_unfuse_restores_the_weights_and_scale_zero_is_the_base(base, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    base_images = _images(_pipe(copy.deepcopy(base)))
    pipe = _pipe(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path, adapter_name="a")
    unfused = _images(pipe)
    # Scale 0 multiplies the LoRA branch by zero in both the U-Net and the text encoder.
    assert np.abs(_images(pipe, cross_attention_kwargs={"scale": 0.0}) - base_images).max() <= 1e-6

    weights = _base_weights(pipe.unet, pipe.text_encoder)
    pipe.fuse_lora()
    assert np.abs(_images(pipe) - unfused).max() <= 1e-5
    pipe.unfuse_lora()
    # Bit for bit: our pipeline puts back the weights it kept at fusing (peft's own unfuse subtracts
    # the update, (W + dW) - dW, which rounds).
    after = _base_weights(pipe.unet, pipe.text_encoder)
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], weights[k]) for k in weights)
    assert np.abs(_images(pipe) - unfused).max() <= 1e-5


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # peft's note on a 2nd adapter
def test_two_adapters_mix_by_their_weights(base, tmp_path):
    paths = []
    for i, name in enumerate(("a", "b")):
        adapted = _adapted(base, LoraSettings(rank=2 + 2 * i, alpha=4.0, text_encoder=True), seed=i)
        paths.append(tmp_path / name)
        save_lora(paths[-1], adapted.unet, adapted.text_encoder)
    pipe = _pipe(copy.deepcopy(base))
    pipe.load_lora_weights(paths[0], adapter_name="a")
    pipe.load_lora_weights(paths[1], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 1.5])

    expected = _unet_out(_merged_unet(base.unet, [(paths[0], 0.5), (paths[1], 1.5)]))
    assert (_unet_out(pipe.unet) - expected).abs().max() <= 1e-5
    assert _images(pipe).shape == (1, 32, 32, 3)


def test_text_encoder_adapter_saves_and_loads(base, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=2.0, text_encoder=True))
    file = save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    keys = safetensors.torch.load_file(file).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)
    assert read_lora_metadata(tmp_path)["text_encoder"]["alpha"] == 2.0

    pipe = _pipe(copy.deepcopy(base))
    pipe.load_lora_weights(tmp_path, adapter_name="te")
    ids = base.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = adapted.text_encoder(ids).last_hidden_state
        plain = base.text_encoder(ids).last_hidden_state
        loaded = pipe.text_encoder(ids).last_hidden_state
    assert (expected - plain).abs().max() > 1e-3
    assert (loaded - expected).abs().max() <= 1e-5
    assert np.abs(_images(pipe) - _images(_pipe(adapted))).max() <= 1e-5


def test_only_adapters_train_and_the_base_stays_bit_identical(parts):
    add_lora(parts.unet, parts.text_encoder, LoraSettings(rank=4, text_encoder=True))
    for model in (parts.unet, parts.text_encoder):
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter_parameters(model)} and trainable
    base_weights = _base_weights(parts.unet, parts.text_encoder)
    groups = lora_param_groups(parts.unet, parts.text_encoder, unet_lr=1e-3, text_encoder_lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4]
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2)
    adapters_before = [p.clone() for p in adapter_parameters(parts.unet)]

    ids = parts.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    latents = torch.randn(1, 4, 8, 8)
    for _ in range(3):
        text = parts.text_encoder(ids).last_hidden_state
        loss = parts.unet(latents, torch.tensor([100]), text).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = _base_weights(parts.unet, parts.text_encoder)
    assert after.keys() == base_weights.keys()
    assert all(torch.equal(after[k], base_weights[k]) for k in base_weights)
    moved = [not torch.equal(p, q) for p, q in zip(adapter_parameters(parts.unet), adapters_before)]
    assert all(moved)


def test_cast_adapters_to_fp32_keeps_the_base_in_half_precision(parts):
    unet = parts.unet.to(torch.bfloat16)
    add_lora(unet)
    assert {p.dtype for p in adapter_parameters(unet)} == {torch.bfloat16}  # peft follows the base
    cast_adapters_to_fp32(unet)
    assert {p.dtype for p in adapter_parameters(unet)} == {torch.float32}
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" not in n} == {torch.bfloat16}

    text = torch.randn(1, 16, 64, dtype=torch.bfloat16)
    out = unet(torch.randn(1, 4, 8, 8, dtype=torch.bfloat16), torch.tensor([100]), text).sample
    assert out.dtype == torch.bfloat16
    out.float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in adapter_parameters(unet))


def test_load_lora_into_loads_frozen_by_default(base, parts, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    load_lora_into(parts.unet, parts.text_encoder, tmp_path)
    assert not any(p.requires_grad for m in (parts.unet, parts.text_encoder) for p in m.parameters())
    assert (_unet_out(parts.unet) - _unet_out(adapted.unet)).abs().max() <= 1e-6


def test_load_lora_into_trainable_continues_training_from_an_adapter_file(base, parts, tmp_path):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    load_lora_into(parts.unet, parts.text_encoder, tmp_path, trainable=True)

    for model, source in ((parts.unet, adapted.unet), (parts.text_encoder, adapted.text_encoder)):
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == {id(p) for p in adapter_parameters(model)} and trainable
        assert model.peft_config["default"].lora_alpha == 8.0
        for p, q in zip(adapter_parameters(model), adapter_parameters(source), strict=True):
            assert torch.equal(p, q)
    assert (_unet_out(parts.unet) - _unet_out(adapted.unet)).abs().max() <= 1e-6

    # Saving the resumed adapter writes the same tensors again.
    again = save_lora(tmp_path / "again", parts.unet, parts.text_encoder)
    first, second = (safetensors.torch.load_file(f) for f in (tmp_path / again.name, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_adapter_scale_zero_is_the_base_and_restores_the_mix(base):
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    adapted.unet.set_adapters(["default"], weights=[0.5])
    to_q = adapted.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    assert to_q.scaling["default"] == 1.0  # 0.5 * alpha / r
    mixed, plain = _unet_out(adapted.unet), _unet_out(base.unet)
    ids = base.tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        plain_text = base.text_encoder(ids).last_hidden_state
        with adapter_scale(adapted.unet, adapted.text_encoder, scale=0.0):
            assert torch.equal(_unet_out(adapted.unet), plain)
            assert torch.equal(adapted.text_encoder(ids).last_hidden_state, plain_text)
        with adapter_scale(adapted.unet, adapted.text_encoder, scale=2.0):
            assert to_q.scaling["default"] == 2.0
    assert to_q.scaling["default"] == 1.0
    assert torch.equal(_unet_out(adapted.unet), mixed)


def test_lora_load_into_a_pipeline_prints_no_load_report(base, tmp_path, caplog, capfd):
    """Nothing is missing from an adapter file that holds every adapter tensor: the load stays quiet
    (no "LOAD REPORT ... MISSING" table from transformers for the text encoder's base weights)."""
    adapted = _adapted(base, LoraSettings(rank=4, alpha=8.0, text_encoder=True))
    save_lora(tmp_path, adapted.unet, adapted.text_encoder)
    pipe = _pipe(copy.deepcopy(base))
    with caplog.at_level("WARNING"):
        pipe.load_lora_weights(tmp_path)
    out = caplog.text + "".join(capfd.readouterr())
    assert "LOAD REPORT" not in out and "MISSING" not in out and "newly initialized" not in out
    assert pipe.get_list_adapters() == {"unet": ["default_0"], "text_encoder": ["default_0"]}


# ---- a U-Net of the shipped recipe's shape: one layers_per_block count per level ----------------


def recipe_preset():
    """The model configs/tiny-shapes.yaml (the demo's recipe) trains from scratch; its U-Net's
    ``layers_per_block`` is a list, one count per level."""
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny-shapes.yaml").read_text())
    preset = get_preset(recipe["preset"]).with_text_encoder_layers(recipe["text_encoder_layers"])
    preset = preset.with_unet_channels(recipe["unet_block_out_channels"])
    preset = preset if recipe["unet_mid_block"] else preset.without_unet_mid_block()
    return preset.with_unet_layers(recipe["unet_layers_per_block"])


@pytest.fixture(scope="module")
def recipe_base():
    parts = build_components(recipe_preset(), seed=0)
    assert isinstance(parts.unet.config.layers_per_block, list)
    return parts


@pytest.fixture(scope="module")
def recipe_lora(recipe_base, tmp_path_factory):
    """A U-Net-only adapter (the recipe's text encoder has no layers to adapt), as configs/tiny-lora.yaml."""
    path = tmp_path_factory.mktemp("recipe-lora")
    save_lora(path, _adapted(recipe_base, LoraSettings(rank=4, alpha=8.0)).unet)
    return path


def test_set_adapters_scales_a_lora_on_a_unet_with_a_count_per_level(recipe_base, recipe_lora):
    pipe = _pipe(copy.deepcopy(recipe_base))
    plain = _images(pipe)
    pipe.load_lora_weights(recipe_lora, adapter_name="a")
    full = _images(pipe)
    assert np.abs(full - plain).max() > 1e-3, "the adapter changed nothing"
    for weight in (0.0, 0.5, 1.0):
        pipe.set_adapters(["a"], adapter_weights=[weight])
        # W + weight * (alpha / r) B A in every adapted layer: the update in proportion to the weight.
        expected = _unet_out(_merged_unet(recipe_base.unet, [(recipe_lora, weight)]))
        assert (_unet_out(pipe.unet) - expected).abs().max() <= 1e-5
    pipe.set_adapters("a", 0.0)
    assert np.abs(_images(pipe) - plain).max() == 0
    pipe.set_adapters("a", {"unet": 1.0})
    assert np.abs(_images(pipe) - full).max() <= 1e-6
    pipe.set_adapters("a", 0.5)
    half = _images(pipe)
    assert 0 < np.abs(half - plain).max() and 0 < np.abs(half - full).max()


def test_per_block_weights_on_such_a_unet_are_refused_in_one_line_changing_nothing(recipe_base, recipe_lora):
    pipe = _pipe(copy.deepcopy(recipe_base))
    pipe.load_lora_weights(recipe_lora, adapter_name="a")
    pipe.set_adapters("a", 0.5)
    before = _unet_out(pipe.unet)
    with pytest.raises(ValueError, match=r"per-block LoRA weights .* \[1, 1, 0\]: give one number") as e:
        pipe.set_adapters("a", {"unet": {"down": 0.2, "up": {"block_1": [1.0, 0.5]}}})
    assert "\n" not in str(e.value)
    assert torch.equal(_unet_out(pipe.unet), before)
    assert "set_adapters" not in vars(pipe.unet)  # the class's own method is back after the call
