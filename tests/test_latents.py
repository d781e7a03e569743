"""The one latent codec: scale and shift applied alike on the way in and out."""

import torch
from diffusers import AutoencoderKL

from sdlite.latents import decode, encode, from_latents, to_latents, vae_factor
from sdlite.presets import get_preset


def _vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(**{**get_preset("tiny").vae, **config}).eval()


def test_latents_subtract_the_shift_then_scale_and_decoding_undoes_both():
    vae = _vae(scaling_factor=0.5, shift_factor=0.25)
    z = torch.randn(2, 4, 8, 8)
    x0 = to_latents(z, vae.config)
    assert torch.allclose(x0, (z - 0.25) * 0.5)
    assert torch.allclose(from_latents(x0, vae.config), z)


def test_a_vae_without_a_shift_only_scales():
    vae = _vae(scaling_factor=0.18215)
    assert vae.config.shift_factor is None
    z = torch.randn(1, 4, 8, 8)
    assert torch.equal(to_latents(z, vae.config), z * 0.18215)


def test_encode_draws_from_the_posterior_with_the_generator_and_decode_inverts_the_codec():
    vae = _vae(scaling_factor=0.5, shift_factor=0.1)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    a = encode(vae, pixels, torch.Generator().manual_seed(3))
    b = encode(vae, pixels, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (2, 4, 32 // vae_factor(vae.config), 32 // vae_factor(vae.config))
    with torch.no_grad():
        expected = vae.decode(a / 0.5 + 0.1).sample
    assert torch.allclose(decode(vae, a), expected)


def test_the_vae_factor_reads_dicts_and_configs_alike():
    vae = _vae()
    assert vae_factor(vae.config) == vae_factor(dict(vae.config)) == get_preset("tiny").vae_factor
