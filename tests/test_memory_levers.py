"""The memory levers (docs/training.md: Fitting a card), each doing what its key says on tiny models.

lora_base_dtype stores the frozen U-Net in bf16 or fp8 with fp32 adapters, upcast per layer without
keeping the upcast copy for the backward; release_encoders frees the VAE and text encoders after
caching; optimizer_kernel and use_8bit_adam make the optimizer asked for. Each trains a step.
"""

import gc
import importlib.util
import sys
import weakref

import pytest
import torch
from test_train import flags

from training.config import ConfigError, parse_config
from training.config.unet import TrainConfig
from training.optim import make_optimizer
from training.stored_weights import StoredConv2d, StoredLinear, store_frozen_weights
from training.train import UNetTrainer, main

LORA = dict(lora="true", lora_from_scratch="true", learning_rate=1e-2, checkpoint_every=0)


def checked(argv: list[str]) -> None:
    """Raises the config's problems, as a run does before anything is built."""
    parse_config(TrainConfig, argv).check()


def trainer(data, cache, out, **overrides) -> UNetTrainer:
    return UNetTrainer(parse_config(TrainConfig, flags(data, cache, out, **overrides)))


def adapters_move(run: UNetTrainer) -> bool:
    """Whether one optimizer step changes the U-Net's adapters (B starts at zero)."""
    before = [p.detach().clone() for n, p in run.parts.unet.named_parameters() if "lora_B" in n]
    logs, nonfinite = run.optimizer_step(0)
    after = [p for n, p in run.parts.unet.named_parameters() if "lora_B" in n]
    assert torch.isfinite(logs["loss"]) and not nonfinite
    return bool(before) and all(not torch.equal(b, a) for b, a in zip(before, after))


# ---- lora_base_dtype ----------------------------------------------------------------------------------


@pytest.mark.parametrize("storage, dtype", [("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)])
def test_lora_base_weights_are_stored_low_and_the_adapters_fp32_and_a_step_trains(
    data, cache, tmp_path, storage, dtype
):
    run = trainer(data, cache, tmp_path, lora_base_dtype=storage, **LORA)
    layers = [m for m in run.parts.unet.modules() if isinstance(m, (StoredLinear, StoredConv2d))]
    assert layers and all(m.weight.dtype == dtype for m in layers)
    adapters = [p for n, p in run.parts.unet.named_parameters() if "lora_" in n]
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters)
    assert all(p.dtype == torch.float32 for n, p in run.parts.unet.named_parameters() if "norm" in n)
    assert adapters_move(run)


def test_a_run_on_an_fp8_base_samples_its_validation_images_and_saves_its_adapters(data, cache, tmp_path):
    argv = flags(data, cache, tmp_path, max_steps=2, lora_base_dtype="fp8", validation_prompts="a red circle",
                 validation_inference_steps=2, **LORA)  # fmt: skip
    final = main(argv)
    assert (final / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "validation" / "step-2.png").is_file()


def test_without_lora_base_dtype_the_base_stays_fp32(data, cache, tmp_path):
    run = trainer(data, cache, tmp_path, **LORA)
    assert not any(isinstance(m, (StoredLinear, StoredConv2d)) for m in run.parts.unet.modules())
    assert all(p.dtype == torch.float32 for p in run.parts.unet.parameters())


def stored_pair(layer: torch.nn.Module, storage: str):
    """(the layer stored low, the same layer in fp32 holding the rounded weights)."""
    reference = layer.requires_grad_(False)
    stored = type(layer)(*reference_args(layer)).requires_grad_(False)
    stored.load_state_dict(reference.state_dict())
    store_frozen_weights(stored, storage)
    reference.weight.data = stored.weight.data.float()
    return stored, reference


def reference_args(layer) -> tuple:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
@pytest.mark.parametrize(
    "layer, shape",
    [(torch.nn.Linear(16, 24), (2, 5, 16)), (torch.nn.Conv2d(8, 12, 3, stride=2, padding=1), (2, 8, 9, 9))],
)
def test_a_stored_layer_computes_and_backpropagates_as_fp32_on_its_rounded_weights(layer, shape, storage):
    stored, reference = stored_pair(layer, storage)
    x = torch.randn(shape, requires_grad=True)
    y = stored(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    x_ref = x.detach().requires_grad_()
    y_ref = reference(x_ref)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x_ref)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)


@pytest.mark.parametrize("layer", [torch.nn.Linear(64, 64), torch.nn.Conv2d(16, 16, 3, padding=1)])
def test_a_stored_layer_keeps_its_stored_weight_for_the_backward_not_an_fp32_copy(layer):
    layer.requires_grad_(False)
    store_frozen_weights(layer, "bf16")
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        x = torch.randn(2, *((64,) if isinstance(layer, torch.nn.Linear) else (16, 8, 8)), requires_grad=True)
        layer(x).sum().backward()
    weights = [t for t in saved if t.shape == layer.weight.shape]
    assert weights and all(t.dtype == torch.bfloat16 for t in weights)


@pytest.mark.parametrize("layer", [torch.nn.Linear(16, 16), torch.nn.Conv2d(4, 4, 3, padding=1)])
def test_a_stored_layer_computes_in_autocasts_dtype_and_gives_its_input_a_gradient_in_its_own(layer):
    layer.requires_grad_(False)
    store_frozen_weights(layer, "fp8")
    x = torch.randn(2, *((16,) if isinstance(layer, torch.nn.Linear) else (4, 6, 6)), requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16):
        y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0


def test_lora_base_dtype_refused_with_an_unknown_value_and_without_lora():
    with pytest.raises(ConfigError, match="lora_base_dtype='fp4': use bf16, fp8 or none"):
        checked(["--lora", "true", "--lora_base_dtype", "fp4", "--lora_from_scratch", "true"])
    with pytest.raises(ConfigError, match="lora_base_dtype set without lora"):
        checked(["--lora_base_dtype", "bf16"])


def test_kohyas_fp8_base_flag_reads_as_lora_base_dtype_fp8():
    cfg = parse_config(TrainConfig, ["--lora", "true", "--fp8_base"])
    assert cfg.adapters.lora_base_dtype == "fp8"


# ---- release_encoders --------------------------------------------------------------------------------


def test_released_encoders_are_freed_after_caching_and_a_step_trains(data, cache, tmp_path):
    refs = {}
    load_model = UNetTrainer.load_model

    def watched(run):
        family = load_model(run)
        refs.update(vae=weakref.ref(family.parts.vae), text_encoder=weakref.ref(family.parts.text_encoder))
        return family

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(UNetTrainer, "load_model", watched)
        run = trainer(data, cache, tmp_path, release_encoders="true", **LORA)
    gc.collect()
    assert refs and all(ref() is None for ref in refs.values())
    assert run.parts.vae.config.scaling_factor > 0  # the latents' scaling stays
    with pytest.raises(AttributeError, match="freed after caching.*release_encoders false"):
        run.parts.text_encoder.to("cpu")
    assert adapters_move(run)


def test_without_release_encoders_the_encoders_stay(data, cache, tmp_path):
    run = trainer(data, cache, tmp_path, **LORA)
    assert isinstance(run.parts.vae, torch.nn.Module) and isinstance(run.parts.text_encoder, torch.nn.Module)


@pytest.mark.parametrize(
    "extra, reason",
    [
        (["--lora", "false"], "a full fine-tune writes them into final_dir"),
        (["--validation_prompts", "a red circle"], "validation images"),
        (["--cache_text", "false"], "needs cache_latents and cache_text true"),
        (["--shuffle_caption", "true"], "a new caption at every draw"),
        (["--lora_text_encoder", "true"], "a trained text encoder"),
    ],
)
def test_release_encoders_refused_where_an_encoder_is_still_needed(extra, reason):
    argv = ["--lora", "true", "--lora_from_scratch", "true", "--release_encoders", "true", *extra]
    with pytest.raises(ConfigError, match=reason):
        checked(argv)


# ---- the optimizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel, fused, foreach", [("fused", True, None), ("foreach", None, True),
                                                    ("loop", None, False)])  # fmt: skip
def test_optimizer_kernel_makes_the_adamw_step_asked_for(kernel, fused, foreach):
    params = [torch.nn.Parameter(torch.randn(8, 8))]
    optimizer = make_optimizer(params, 1e-3, kernel=kernel)
    assert type(optimizer) is torch.optim.AdamW
    assert (optimizer.defaults["fused"], optimizer.defaults["foreach"]) == (fused, foreach)


def test_each_optimizer_kernel_takes_the_same_step():
    steps = []
    for kernel in ("fused", "foreach", "loop"):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32, 32))
        optimizer = make_optimizer([p], 1e-2, kernel=kernel)
        for _ in range(3):
            p.grad = torch.sin(p.detach() * 3)
            optimizer.step()
        steps.append(p.detach())
    torch.testing.assert_close(steps[0], steps[1])
    torch.testing.assert_close(steps[0], steps[2])


def test_the_run_uses_the_optimizer_kernel_of_its_config(data, cache, tmp_path):
    run = trainer(data, cache, tmp_path, optimizer_kernel="loop", **LORA)
    assert run.optimizer.optimizer.defaults["foreach"] is False
    assert adapters_move(run)


def test_use_8bit_adam_keeps_8_bit_moments_and_trains(data, cache, tmp_path):
    pytest.importorskip("bitsandbytes", reason="use_8bit_adam needs bitsandbytes installed")
    run = trainer(data, cache, tmp_path, use_8bit_adam="true", **LORA)
    assert type(run.optimizer.optimizer).__name__ == "AdamW8bit"
    big = torch.nn.Parameter(torch.randn(128, 64))  # bitsandbytes keeps tensors under 4096 values in fp32
    optimizer = make_optimizer([big], 1e-3, use_8bit=True)
    big.grad = torch.randn_like(big)
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert adapters_move(run)


def test_optimizer_kernel_refused_with_an_unknown_value_and_with_8bit_adam():
    with pytest.raises(ConfigError, match="optimizer_kernel='apex': use one of fused, foreach, loop"):
        checked(["--optimizer_kernel", "apex"])
    with pytest.raises(ConfigError, match="bitsandbytes' AdamW8bit has its own kernel"):
        checked(["--optimizer_kernel", "foreach", "--use_8bit_adam", "true"])


def test_use_8bit_adam_without_bitsandbytes_is_refused_at_start_up_naming_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(
        ConfigError, match=r"^bad training config: use_8bit_adam needs bitsandbytes: pip install"
    ):
        checked(["--use_8bit_adam", "true"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # and where the optimizer is made: one line too
    with pytest.raises(ImportError, match=r"use_8bit_adam needs bitsandbytes \(pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2))], 1e-3, use_8bit=True)
