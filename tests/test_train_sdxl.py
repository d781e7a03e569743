import torch

from sdlite.data.dataset import ImageTransform
from sdlite.models_xl import build_components_xl
from sdlite.training.sdxl_step import DenoiserXL, square_time_ids


def test_square_time_ids_name_the_original_size_and_the_centre_crop():
    transform = ImageTransform(resolution=32)
    # a 64x32 (w, h) image resizes to 64x32, its centre crop starts 16 px from the left
    assert square_time_ids(transform, (64, 32), 0) == (32, 64, 0, 16, 32, 32)
    assert square_time_ids(ImageTransform(resolution=32), (40, 100), 0) == (100, 40, 24, 0, 32, 32)


def test_square_time_ids_measure_a_flipped_crop_from_its_new_left_edge():
    transform = ImageTransform(resolution=32, random_crop=True, seed=3)
    left = transform.crop_box((96, 32), 5)[0]
    assert square_time_ids(transform, (96, 32), 5, flip=True)[3] == 96 - (left + 32)


def test_denoiser_xl_passes_pooled_and_time_ids_to_the_unet():
    parts = build_components_xl("tiny-sdxl", seed=0)
    model = DenoiserXL(parts.unet).eval()
    cfg = parts.unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8)
    t = torch.tensor([10, 500])
    embeds = torch.randn(2, 77, cfg.cross_attention_dim)
    pooled_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    pooled = torch.randn(2, pooled_dim)
    ids = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        a = model(x, t, (embeds, pooled, ids))
        b = model(x, t, (embeds, pooled, ids * 2))
    assert a.shape == x.shape
    assert not torch.allclose(a, b)  # the size/crop numbers reach the U-Net
