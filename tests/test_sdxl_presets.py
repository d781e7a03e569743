"""The SDXL presets: SDXL 1.0 base's exact sizes (counted without allocating) and a tiny SDXL that trains."""

import time

import pytest
import torch
import torch.nn.functional as F

from sdlite.conditioning_xl import add_time_ids, encode_prompts_xl
from sdlite.models_xl import build_components_xl
from sdlite.presets import XL_PRESETS, get_preset
from training.config.unet import ModelSection


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_sdxl_preset_has_sdxl_1_0_base_parameter_counts_without_allocating_them():
    parts = build_components_xl("sdxl", seed=None, device="meta")  # 13 GB in float32 if allocated
    models = (parts.unet, parts.text_encoder, parts.text_encoder_2, parts.vae)
    assert all(p.is_meta for m in models for p in m.parameters())
    # SDXL 1.0 base: U-Net, CLIP ViT-L/14, OpenCLIP ViT-bigG/14 with its projection, VAE.
    assert [_n_params(m) for m in models] == [2_567_463_684, 123_060_480, 694_659_840, 83_653_863]


def test_sdxl_preset_has_sdxl_conditioning_shapes():
    p = get_preset("sdxl")
    unet = p.unet
    assert unet["cross_attention_dim"] == 768 + 1280 == p.cross_attention_dim
    assert unet["projection_class_embeddings_input_dim"] == 6 * 256 + 1280 == 2816
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["attention_head_dim"] == [5, 10, 20]
    assert unet["down_block_types"] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet["addition_embed_type"] == "text_time" and unet["use_linear_projection"] is True
    assert p.vae["scaling_factor"] == 0.13025 and p.vae["force_upcast"] is True
    assert p.text_encoder["hidden_act"] == "quick_gelu" and p.text_encoder_2["hidden_act"] == "gelu"
    assert (p.text_encoder_2["num_hidden_layers"], p.text_encoder_2["num_attention_heads"]) == (32, 20)
    assert p.text_encoder_2["projection_dim"] == 1280 and p.text_encoder_2["intermediate_size"] == 5120
    assert (p.resolution, p.vae_factor, p.latent_size, p.max_length) == (1024, 8, 128, 77)


def test_tiny_sdxl_has_sdxls_structure_at_32_pixels():
    tiny, full = get_preset("tiny-sdxl"), get_preset("sdxl")
    for key in ("down_block_types", "up_block_types", "addition_embed_type", "use_linear_projection"):
        assert tiny.unet[key] == full.unet[key], key
    assert (
        tiny.unet["cross_attention_dim"]
        == tiny.text_encoder["hidden_size"] + tiny.text_encoder_2["hidden_size"]
    )
    # Encoder widths differ, as SDXL's do (diffusers tells the encoders in a single file apart by width).
    assert tiny.text_encoder["hidden_size"] != tiny.text_encoder_2["hidden_size"]
    assert (tiny.resolution, tiny.latent_size) == (32, 8)


def test_sdxl_presets_are_found_by_get_preset_like_the_others():
    assert get_preset("sdxl") is XL_PRESETS["sdxl"]
    assert get_preset("tiny-sdxl") is XL_PRESETS["tiny-sdxl"]


def test_the_sd_shape_keys_leave_an_sdxl_preset_to_its_family():
    """The model section asks a preset whether the from-scratch shape keys reshape it (an SD preset)
    instead of testing its class; SDXL's family names each such key as refused (training/family_sdxl.py)."""
    assert get_preset("tiny").reshapeable and not get_preset("tiny-sdxl").reshapeable
    assert ModelSection(preset="tiny", unet_block_out_channels=[32, 64, 72]).problems()
    assert ModelSection(preset="tiny-sdxl", unet_block_out_channels=[32, 64, 72]).problems() == []


def test_an_sd1_preset_is_refused_for_sdxl_parts_naming_the_sdxl_presets():
    with pytest.raises(ValueError, match="'sdxl' or 'tiny-sdxl'"):
        build_components_xl("tiny")


def _batch(parts, n=4):
    p = get_preset("tiny-sdxl")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 4, p.latent_size, p.latent_size, generator=g)
    with torch.no_grad():  # a cache's embeddings: the encoders are not trained here
        embeds, pooled = encode_prompts_xl(
            parts.text_encoder, parts.text_encoder_2, parts.tokenizer, parts.tokenizer_2,
            ["a red circle", "a blue square", "a green triangle", "a red square"][:n],
        )  # fmt: skip
    time_ids = add_time_ids([[32, 32]] * n, [[0, 0]] * n, [[32, 32]] * n)
    return x0, embeds, pooled, time_ids


def test_tiny_sdxl_unet_takes_both_encoders_pooled_embedding_and_six_numbers():
    parts = build_components_xl("tiny-sdxl", seed=0)
    x0, embeds, pooled, time_ids = _batch(parts)
    assert embeds.shape == (4, 16, 32 + 64) and pooled.shape == (4, 32) and time_ids.shape == (4, 6)
    cond = {"text_embeds": pooled, "time_ids": time_ids}
    eps = parts.unet(x0, torch.tensor([1, 10, 100, 999]), embeds, added_cond_kwargs=cond).sample
    assert eps.shape == x0.shape
    # The six numbers change the prediction: the U-Net reads them.
    other = parts.unet(x0, torch.tensor([1, 10, 100, 999]), embeds,
                       added_cond_kwargs={**cond, "time_ids": time_ids * 2}).sample  # fmt: skip
    assert not torch.allclose(eps, other)


def test_tiny_sdxl_trains_on_the_cpu_in_seconds():
    parts = build_components_xl("tiny-sdxl", seed=0)
    x0, embeds, pooled, time_ids = _batch(parts)
    sched = parts.scheduler
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = sched.q_sample(x0, t, noise)  # x_t ~ q(x_t | x_0), Ho et al. 2020 eq. 4
    opt = torch.optim.AdamW(parts.unet.parameters(), lr=1e-3)
    losses, start = [], time.perf_counter()
    for _ in range(10):  # the ε-loss on one fixed batch (Ho et al. 2020 eq. 14)
        cond = {"text_embeds": pooled, "time_ids": time_ids}
        loss = F.mse_loss(parts.unet(x_t, t, embeds, added_cond_kwargs=cond).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    assert losses[-1] < 0.7 * losses[0], losses
    print(f"tiny-sdxl: {seconds / 10:.3f} s a step (batch 4)")
    assert seconds < 20, f"10 steps took {seconds:.1f} s"
