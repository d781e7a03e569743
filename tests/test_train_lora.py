"""training/train.py with --lora true: the same loop trains adapters on a frozen base.

Checked here on the tiny preset: only adapter weights move (the base is bit-identical after), the
text encoder's adapter trains at its own rate, checkpoints hold only the adapters and resume exactly,
two processes train like one, the saved file loads in sdlite's and diffusers' pipelines alike, and a
LoRA run on a colour the base never saw lowers that colour's bits/dim and teaches the base to draw it
(both measured with sdlite/fidelity.py and sdlite/likelihood.py).
"""

import copy
import dataclasses
import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file
from test_train import ROOT, flags, launch, run_killed_at, trainers_kept

from pipelines import TextToImagePipeline
from sdlite.data.shapes import write_dataset
from sdlite.ddpm import DDPMScheduler
from sdlite.fidelity import pipeline_generate, prompt_fidelity
from sdlite.likelihood import variational_bound
from sdlite.lora import adapter_parameters, load_lora_into, read_lora_metadata
from sdlite.models import build_components, load_components
from sdlite.presets import get_preset
from training.cmd_evaluate import held_out_data
from training.config import parse_config
from training.config.unet import TrainConfig
from training.train import UNetTrainer, main

# U-Net and text-encoder adapters, alpha / r = 2, at two learning rates; lr 1e-2 so that three steps
# change the images visibly. ema_decay (0.9 in flags) is ignored by a LoRA run.
LORA = dict(lora="true", lora_rank=4, lora_alpha=8, lora_text_encoder="true", learning_rate=1e-2,
            text_encoder_lr=1e-3, lora_from_scratch="true")  # fmt: skip


@pytest.fixture(scope="module")
def trained(data, cache, tmp_path_factory):
    """A 3-step LoRA run, and the trainer that ran it (kept from save_final)."""
    out = tmp_path_factory.mktemp("lora")
    with trainers_kept() as runs:
        main(flags(data, cache, out, **LORA))
    return out, runs[0]


def base_weights(model) -> dict[str, torch.Tensor]:
    """A peft-wrapped model's weights but the adapters', under their names before wrapping."""
    state = model.state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def test_only_the_adapters_train_and_the_base_stays_bit_identical(trained):
    out, run = trained
    initial = build_components("tiny", seed=0)  # what the run started from (preset, seed 0)
    for part in ("unet", "text_encoder", "vae"):
        before, after = getattr(initial, part).state_dict(), base_weights(getattr(run.parts, part))
        assert before.keys() == after.keys(), part
        assert all(torch.equal(before[k], after[k]) for k in before), part
    for part in ("unet", "text_encoder"):
        lora_B = [p for n, p in getattr(run.parts, part).named_parameters() if "lora_B" in n]
        assert lora_B and all(p.abs().max() > 0 for p in lora_B), f"{part}: B starts at zero and moved"
    assert [g["lr"] for g in run.optimizer.param_groups] == [1e-2, 1e-3]  # U-Net, text encoder
    assert run.ema is None
    trainable = sum(p.numel() for p in run.params)
    assert trainable == sum(p.numel() for part in (run.parts.unet, run.parts.text_encoder)
                            for p in adapter_parameters(part))  # fmt: skip

    checkpoint = out / "checkpoint-3"
    saved = {f.name for f in checkpoint.glob("*.safetensors")}
    assert saved == {"unet_lora.safetensors", "text_encoder_lora.safetensors", "rng-0.safetensors"}
    stored = sum(t.numel() for f in ("unet_lora", "text_encoder_lora")
                 for t in load_file(checkpoint / f"{f}.safetensors").values())  # fmt: skip
    assert stored == trainable
    assert read_lora_metadata(out / "final") == {
        "base_model": "sdlite preset tiny",
        "unet": {"rank": 4, "alpha": 8.0, "targets": ["to_k", "to_out.0", "to_q", "to_v"]},
        "text_encoder": {"rank": 4, "alpha": 8.0, "targets": ["k_proj", "out_proj", "q_proj", "v_proj"]},
    }
    assert not (out / "final" / "unet").exists()  # no copy of the base


def test_under_bf16_the_base_is_bf16_and_the_adapters_fp32(data, cache, tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(UNetTrainer, "save_final", lambda trainer: runs.append(trainer))
    # accelerate keeps one state per process and refuses another precision: reset it around this run.
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        main(flags(data, cache, tmp_path, mixed_precision="bf16", max_steps=2, checkpoint_every=0, **LORA))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    unet = runs[0].parts.unet
    assert {p.dtype for n, p in unet.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert {p.dtype for p in adapter_parameters(unet)} == {torch.float32}
    assert all(p.abs().max() > 0 for n, p in unet.named_parameters() if "lora_B" in n)


def adapter_difference(a: Path, b: Path) -> torch.Tensor:
    wa, wb = (load_file(d / "final" / "pytorch_lora_weights.safetensors") for d in (a, b))
    assert wa.keys() == wb.keys()
    return torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])


def test_an_interrupted_lora_run_resumed_from_its_checkpoint_ends_with_the_same_adapter(
    data, cache, tmp_path, monkeypatch
):
    # lora_dropout draws from the global RNG, which the checkpoint restores.
    options = dict(LORA, max_steps=4, checkpoint_every=2, lr_scheduler="cosine", lr_warmup_steps=1,
                   caption_dropout=0.25, lora_dropout=0.1)  # fmt: skip
    main(flags(data, cache, tmp_path / "whole", **options))
    run_killed_at(monkeypatch, 3, lambda: main(flags(data, cache, tmp_path / "broken", **options)))
    main(flags(data, cache, tmp_path / "broken", resume="latest", **options))
    assert adapter_difference(tmp_path / "whole", tmp_path / "broken").max() == 0


def test_two_launched_processes_train_the_adapter_like_one(trained, data, cache, tmp_path):
    two = ["--multi_gpu", "--num_processes", "2"]
    log = launch(two, flags(data, cache, tmp_path, train_batch_size=2, **LORA))
    assert "global batch 4" in log
    # The same global batch split in two: equal up to float32 summation order (see tests/test_train.py).
    difference = adapter_difference(trained[0], tmp_path)
    assert difference.mean() < 1e-6 and (difference > 1e-5).float().mean() < 1e-3


def _with_steps_offset_1(parts):
    # diffusers' pipeline rewrites steps_offset to 1 in its scheduler: give both pipelines that.
    config = {k: v for k, v in parts.scheduler.config.items() if not k.startswith("_")}
    return dataclasses.replace(parts, scheduler=DDPMScheduler.from_config(config | {"steps_offset": 1}))


def test_the_trained_adapter_gives_the_same_images_in_sdlite_and_diffusers(trained):
    out = trained[0] / "final"
    base = _with_steps_offset_1(build_components("tiny", seed=0))
    ours = TextToImagePipeline(**copy.deepcopy(base).as_dict())
    theirs = StableDiffusionPipeline(**copy.deepcopy(base).as_dict(), safety_checker=None,
                                     feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    kw = dict(num_inference_steps=3, guidance_scale=3.0, output_type="np")
    plain = ours(["a red circle", "a blue square"], generator=torch.Generator().manual_seed(0), **kw).images
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(out, adapter_name="shapes")
        generator = torch.Generator().manual_seed(0)
        images.append(pipe(["a red circle", "a blue square"], generator=generator, **kw).images)
    assert np.abs(images[0] - plain).max() > 1e-3, "the adapter changed nothing"
    assert np.abs(images[0] - images[1]).max() <= 1e-5


@pytest.mark.parametrize("recipe", ["tiny-lora.yaml", "sd15-lora.yaml"])
def test_the_lora_recipes_are_train_configs(recipe):
    cfg = parse_config(TrainConfig, ["--config", str(ROOT / "configs" / recipe)])
    assert cfg.adapters.lora and cfg.optimizer.max_steps > 0
    assert cfg.text_encoder_trains == cfg.adapters.lora_text_encoder


def test_bad_lora_settings_fail_before_training(data, tmp_path):
    with pytest.raises(ValueError, match="lora_text_encoder"):
        main(flags(data, tmp_path, tmp_path, lora="true", train_text_encoder="true"))
    with pytest.raises(ValueError, match="lora_rank"):
        main(flags(data, tmp_path, tmp_path, lora="true", lora_rank=0))
    # The demo's model: a text encoder of 0 layers, no attention for an adapter. Said before any caching.
    base = build_components(get_preset("tiny").with_text_encoder_layers(0)).save_pretrained(tmp_path / "base")
    with pytest.raises(ValueError, match=r"text_encoder \(0 layers\) has none .*set lora_text_encoder false"):
        main(flags(data, tmp_path / "cache", tmp_path / "run", lora="true", lora_text_encoder="true",
                   pretrained=base))  # fmt: skip
    with pytest.raises(ValueError, match=r"the U-Net has none of the adapter's target modules \['to_qkv'\]"):
        main(flags(data, tmp_path / "cache", tmp_path / "run", lora="true", lora_target_modules="[to_qkv]",
                   pretrained=base))  # fmt: skip
    assert not (tmp_path / "cache").exists()


# ---- a colour the base never saw ----------------------------------------------------------------------

BASE_STEPS, LORA_STEPS = 30, 30
# Measured drops with seeds 0 / 1 / 2: 0.28 / 0.43 / 0.47 bits/dim (5.35 -> 5.07, 5.44 -> 5.01,
# 5.70 -> 5.23). A third of the smallest is asked for.
DROP_MARGIN = 0.1


def held_out_bits_per_dim(parts, folder: Path) -> float:
    images, captions = held_out_data(str(folder), 16, 32, seed=0)
    return variational_bound(parts, images, captions, stride=100, dense_below=5, seed=0).bpd


@pytest.mark.parametrize("seed", [0])  # [0, 1, 2] for the figures above
def test_a_lora_run_lowers_the_bits_per_dim_of_a_colour_the_base_never_saw(tmp_path, seed):
    """The cut-down version of benchmarks/lora_new_colour.py, in seconds: a base trained briefly on
    shapes of every colour but magenta, then a LoRA run on magenta shapes alone; held-out magenta
    shapes' bits/dim (sdlite/likelihood.py, eq. 5 of Ho et al.) before and after.

    This shows less than the script's prompt fidelity. The adapter lowers the new colour's bits/dim
    (figures at DROP_MARGIN), but at this length most of the gain is generic: in trial runs shapes
    of the colours the base knew gained about as much (-0.164 against -0.169 for magenta), and an
    adapter trained on the known colours lowered magenta's about as much as a magenta one: a
    4 M-parameter U-Net learns no colour conditioning in tens of steps. That the adapter teaches the
    colour itself is what the script measures, reading the colour back from the pixels: magenta
    prompts 0% -> 100% correct, the base at scale 0.
    """
    base_data = write_dataset(tmp_path / "base", count=64, seed=seed, exclude=["magenta"])
    new = write_dataset(tmp_path / "magenta", count=32, seed=seed + 1, colours=["magenta"], holdout=16)
    # The preset's random VAE, its latents scaled to unit variance as train_vae.py would.
    parts = build_components("tiny", seed=0)
    images, _ = held_out_data(str(base_data), 64, 32, seed=0)
    with torch.no_grad():
        std = parts.vae.encode(images).latent_dist.mean.std().item()
    parts.vae.register_to_config(scaling_factor=1 / std)
    parts.vae.save_pretrained(tmp_path / "vae" / "vae")
    common = dict(cache_dir=tmp_path / "cache", train_batch_size=16, checkpoint_every=0, ema_decay="none",
                  seed=seed, report_to="none", log_every=100)  # fmt: skip
    main(flags(base_data, tmp_path / "cache", tmp_path / "base-run", train_data_dir=base_data,
               vae_path=tmp_path / "vae", train_text_encoder="true", max_steps=BASE_STEPS,
               learning_rate=3e-3, **common))  # fmt: skip
    base = load_components(tmp_path / "base-run" / "final")
    main(flags(base_data, tmp_path / "cache", tmp_path / "lora-run", train_data_dir=new / "train",
               pretrained=tmp_path / "base-run" / "final", lora="true", lora_rank=8, lora_text_encoder="true",
               max_steps=LORA_STEPS, learning_rate=1e-2, **common))  # fmt: skip
    tuned = copy.deepcopy(base)
    load_lora_into(tuned.unet, tuned.text_encoder, tmp_path / "lora-run" / "final", trainable=False)
    before, after = (held_out_bits_per_dim(p, new / "test") for p in (base, tuned))
    print(f"magenta held-out bits/dim: base {before:.4f}, with the adapter {after:.4f}")
    assert after < before - DROP_MARGIN


# ---- ... and draws it: prompt fidelity before and after ----------------------------------------------


def pixel_codec(big: float = 1000.0, shift: float = 20.0) -> AutoencoderKL:
    """The tiny preset's VAE with hand-set weights (norm_num_groups=1): latents are the 4x4 mean
    colour of the pixels minus white (channels 0-2; channel 3 is 0), decoding repeats each latent
    pixel 4x4. Exact to 1e-4 for every colour, so it cannot hide or invent one: what is measured is
    the U-Net's. (Training the preset's VAE to read colours back costs minutes.)

    Every resnet and attention branch is zeroed, so the blocks pass their input on; the convolutions
    carry (x, -x) per colour and two constant channels (big, -big), which pins the output GroupNorms'
    mean at 0 and their std at big * sqrt(2 / channels), so that they scale back exactly; their
    shift moves SiLU into its linear range and the output convolution takes it off again."""
    vae = AutoencoderKL(**get_preset("tiny").config("vae") | {"norm_num_groups": 1})
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.fill_(1.0)
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):  # shortcuts, (post_)quant_conv
                for c in range(min(8, m.in_channels, m.out_channels)):
                    m.weight[c, c, 0, 0] = 1.0
        for conv in (enc.conv_in, dec.conv_in):
            for c in range(3):
                conv.weight[2 * c, c, 1, 1], conv.weight[2 * c + 1, c, 1, 1] = 1.0, -1.0
                if conv is dec.conv_in:  # latents are x - 1: white is 0
                    conv.bias[2 * c], conv.bias[2 * c + 1] = 1.0, -1.0
            conv.bias[6], conv.bias[7] = big, -big
        for c in range(8):
            for block in enc.down_blocks:
                for down in block.downsamplers or []:  # padded right and bottom, 3x3 stride 2: a 2x2 mean
                    down.conv.weight[c, c, :2, :2] = 0.25
            for block in dec.up_blocks:
                for up in block.upsamplers or []:  # after nearest-neighbour upsampling
                    up.conv.weight[c, c, 1, 1] = 1.0
        for norm, conv in ((enc.conv_norm_out, enc.conv_out), (dec.conv_norm_out, dec.conv_out)):
            norm.weight.fill_(big * (2 / norm.num_channels) ** 0.5)
            norm.bias.fill_(shift)
            for c in range(3):
                conv.weight[c, 2 * c, 1, 1] = 1.0
                conv.bias[c] = -shift - (1.0 if conv is enc.conv_out else 0.0)
        enc.conv_out.bias[4:] = -30.0  # log-variance at diffusers' floor: z is the mean
    return vae


def test_the_pixel_codec_passes_every_colour_through():
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    vae = pixel_codec()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
        decoded = vae.decode(latents).sample
    pooled = torch.nn.functional.avg_pool2d(images, 4)
    assert torch.allclose(latents[:, :3], pooled - 1, atol=1e-4) and latents[:, 3].abs().max() == 0
    assert torch.allclose(decoded, torch.nn.functional.interpolate(pooled, scale_factor=4), atol=1e-4)


# Squares only, 16 px (4x4 latents: a quarter of the 32 px cost per step), captions without size words.
# No blue among the known colours: a blob half red and half blue has a median that reads as magenta.
KNOWN, NEW, SHAPE, SIZE = ("red", "green", "yellow"), "magenta", "square", 16
SQUARES = dict(shapes=[SHAPE], image_size=SIZE, size_word_prob=0.0)
# 20 DDPM steps at guidance 7: a base this short follows its colour words weakly, and guidance amplifies
# that (in trial runs guidance 2 read back roughly half as many right colours).
SAMPLING = dict(num_inference_steps=20, guidance_scale=7.0)
# Asked of the colour read back (figures in the test's docstring): the base's known colours, and the
# magenta prompts before and after the LoRA run.
KNOWN_MIN, BEFORE_MAX, AFTER_MIN = 0.6, 0.25, 0.5


@pytest.fixture(scope="module", params=[1])  # [0, 1, 2] for the figures in the test's docstring
def colour_base(request, tmp_path_factory):
    """A base trained on red, green and yellow squares (600 steps, frozen random text encoder) on
    pixel_codec's latents, and its folder's parent (its cache, VAE and data beside it)."""
    seed, root = request.param, tmp_path_factory.mktemp("colour-base")
    data = write_dataset(root / "known", count=256, seed=seed, colours=KNOWN, **SQUARES)
    vae = pixel_codec()
    with torch.no_grad():
        std = vae.encode(held_out_data(str(data), 64, SIZE, seed=0)[0]).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1 / std)
    vae.save_pretrained(root / "vae" / "vae")
    # The text encoder stays at its random init: trained along, it pulls the colour words' embeddings
    # together (relative distance 0.3 -> 0.06 in 250 steps) before the U-Net has learnt to use them.
    main(flags(data, root / "cache", root / "base", train_data_dir=data, vae_path=root / "vae",
               resolution=SIZE, max_steps=600, learning_rate=3e-3, lr_warmup_steps=20,
               lr_scheduler="constant_with_warmup", snr_gamma=5, caption_dropout=0.1,
               **common_flags(seed)))  # fmt: skip
    return seed, root


def common_flags(seed: int) -> dict:
    return dict(train_batch_size=16, checkpoint_every=0, ema_decay="none", seed=seed, report_to="none",
                log_every=1000)  # fmt: skip


def colour_right(parts, colours, n: int = 8) -> float:
    """The fraction of n images per "a <colour> square" whose square reads back in that colour
    (sdlite/fidelity.py: the palette colour nearest the shape's median pixel)."""
    pipe = TextToImagePipeline(**parts.as_dict())
    pipe.set_progress_bar_config(disable=True)
    generate = pipeline_generate(functools.partial(pipe, height=SIZE, width=SIZE), **SAMPLING)
    report = prompt_fidelity(generate, [f"a {c} {SHAPE}" for c in colours], n=n, seed=0, image_size=SIZE)
    print(report.table())
    return float(np.mean([score.colour for score in report.scores]))


def test_a_lora_run_teaches_the_base_to_draw_a_colour_it_never_saw(colour_base):
    """benchmarks/lora_new_colour.py cut down to a minute: a base that knows red, green and yellow
    squares, a LoRA run (100 steps, rank 8, attention, convolution and projection layers, text encoder
    too) on magenta squares alone, and 8 images for "a magenta square" whose colour is read back from
    the pixels (sdlite/fidelity.py's prompt fidelity), before and after. The VAE is pixel_codec, a
    lossless colour codec, so that the colour is the U-Net's doing.

    Measured with seeds 0 / 1 / 2 (2 shared CPU cores, 1 thread; 8 images a prompt): the base's
    known colours right 83% / 92% / 96%, magenta 0% / 12% / 0%; with the adapter magenta 75% / 75% /
    88%. The base took 43-45 s (the fixture, once per module), the LoRA run and the evaluation 12-15 s.
    Thresholds at KNOWN_MIN, BEFORE_MAX, AFTER_MIN: two images of eight below the lowest figure.
    On another 2-core machine (AMD EPYC, AVX2 kernels; 2026-12-01) the same seeds gave known colours
    54% / 92% / passing (seed 0's base drew "a green square" green 1 time in 8): a base this small
    follows the CPU's float kernels to another minimum, so the test trains seed 1's, which drew 92%
    on both machines (magenta 0%, with the adapter 100% on the second).

    The adapter, trained on the new colour alone, paints the known colours magenta too (the script
    shows that mixing in known images keeps them); what is checked is that it draws a colour the
    base could not, and that the base did follow its prompts' colours.
    """
    seed, root = colour_base
    new = write_dataset(root / f"new-{seed}", count=64, seed=seed + 1, colours=[NEW], **SQUARES)
    out = root / f"lora-{seed}"
    main(flags(new, root / "cache", out, train_data_dir=new, pretrained=root / "base" / "final",
               resolution=SIZE, lora="true", lora_rank=8, lora_alpha=16, lora_text_encoder="true",
               lora_target_modules="to_q,to_k,to_v,to_out.0,proj_in,proj_out,conv1,conv2,conv_out",
               max_steps=100, learning_rate=1e-2, **common_flags(seed)))  # fmt: skip
    base = load_components(root / "base" / "final")
    tuned = copy.deepcopy(base)
    load_lora_into(tuned.unet, tuned.text_encoder, out / "final", trainable=False)
    known, before, after = colour_right(base, KNOWN), colour_right(base, [NEW]), colour_right(tuned, [NEW])
    print(f"base: known colours {known:.0%}, magenta {before:.0%}; with the adapter: magenta {after:.0%}")
    assert known >= KNOWN_MIN, "the base did not learn to follow its prompts' colours"
    assert before <= BEFORE_MAX and after >= AFTER_MIN
