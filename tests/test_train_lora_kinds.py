"""training/train.py with --lora_type loha | lokr and --lora_dora true: the LoRA loop trains LyCORIS' and
DoRA's adapters on a frozen base, saves them in the files A1111, ComfyUI and diffusers read, and our
pipelines loading those files compute what the trained model computed; an interrupted run resumes to the
same adapter; SDXL's runs write sd-scripts' SGM block names with lora_save_format kohya.

Each run is 3 steps of the tiny preset (or tiny-sdxl) at a rate that moves every adapter.
"""

import copy

import pytest
import safetensors
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from test_lycoris_write import epsilon
from test_train import flags, run_killed_at, trainers_kept

from pipelines import TextToImagePipeline, TextToImageXLPipeline
from sdlite.lora import ADAPTER_TENSORS
from sdlite.lycoris import read_lycoris
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl
from training.train import main

KINDS = {
    "loha": dict(lora_type="loha"),
    "lokr": dict(lora_type="lokr"),
    "dora": dict(lora_dora="true", lora_save_format="kohya"),
}
OPTIONS = dict(lora="true", lora_rank=4, lora_alpha=2, lora_text_encoder="true", learning_rate=1e-2,
               lora_from_scratch="true", checkpoint_every=2)  # fmt: skip


def trained_run(argv: list[str]):
    """Run train.py's main; returns the trainer (kept from save_final), its adapted models intact."""
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with trainers_kept() as runs:
            main(argv)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    return runs[0]


def is_adapter(key: str) -> bool:
    return any(f".{name}." in key for name in ADAPTER_TENSORS)


def base_weights(model) -> dict[str, torch.Tensor]:
    """A peft-wrapped model's weights but the adapters', under their names before wrapping."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if not is_adapter(k)}


def text_states(encoder) -> torch.Tensor:
    with torch.no_grad():
        return encoder(torch.tensor([[49406, 320, 1000, 49407, 49407, 49407]]))[0]


@pytest.fixture(scope="module")
def runs(data, cache, tmp_path_factory):
    """One 3-step run of each kind: {kind: (final folder, trainer)}."""
    out = {}
    for kind, options in KINDS.items():
        folder = tmp_path_factory.mktemp(kind)
        out[kind] = folder / "final", trained_run(flags(data, cache, folder, **OPTIONS, **options))
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_only_its_adapters_and_the_base_stays_bit_identical(runs, kind):
    _, run = runs[kind]
    initial = build_components("tiny", seed=0)
    for part in ("unet", "text_encoder"):
        model = getattr(run.parts, part)
        before, after = getattr(initial, part).state_dict(), base_weights(model)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), part
        adapters = [n for n, p in model.named_parameters() if is_adapter(n)]
        assert adapters and {n for n, p in model.named_parameters() if p.requires_grad} <= set(adapters)
    assert epsilon(run.parts.unet).sub(epsilon(initial.unet)).abs().max() > 1e-4  # it learnt something


@pytest.mark.parametrize("kind", list(KINDS))
def test_our_pipeline_loading_the_saved_file_computes_what_the_run_trained(runs, kind):
    final, run = runs[kind]
    files = {f.name for f in final.glob("*.safetensors")}
    both = {"pytorch_lora_weights.safetensors", "lora_kohya.safetensors"}
    assert files == (both if kind == "dora" else {"lora_kohya.safetensors"})  # diffusers reads no LoHa, LoKr
    trained_eps, trained_text = epsilon(run.parts.unet), text_states(run.parts.text_encoder)
    sources = [final / name for name in sorted(files)]  # DoRA: diffusers' file, then the LyCORIS one
    for source in [final, *sources]:
        pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
        pipe.load_lora_weights(str(source))
        assert torch.allclose(epsilon(pipe.unet), trained_eps, rtol=1e-4, atol=1e-5), source.name
        assert torch.allclose(text_states(pipe.text_encoder), trained_text, rtol=1e-4, atol=1e-5)
    with safetensors.safe_open(final / "lora_kohya.safetensors", framework="pt") as f:
        suffixes = {k.split(".", 1)[1] for k in f.keys()}
    expected = {"loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},
                "dora": {"lora_down.weight", "lora_up.weight", "dora_scale"}}  # fmt: skip
    assert expected.get(kind, {"lokr_w1"}) | {"alpha"} <= suffixes


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_an_interrupted_run_of_each_kind_resumed_from_its_checkpoint_ends_with_the_same_adapter(
    data, cache, tmp_path, monkeypatch, kind
):
    options = dict(OPTIONS, **KINDS[kind], max_steps=4, lr_scheduler="cosine", caption_dropout=0.25)
    main(flags(data, cache, tmp_path / "whole", **options))
    run_killed_at(monkeypatch, 3, lambda: main(flags(data, cache, tmp_path / "broken", **options)))
    main(flags(data, cache, tmp_path / "broken", resume="latest", **options))
    whole, broken = (
        load_file(tmp_path / d / "final" / "lora_kohya.safetensors") for d in ("whole", "broken")
    )
    assert whole.keys() == broken.keys() and all(torch.equal(whole[k], broken[k]) for k in whole)


@pytest.mark.parametrize("kind", ["lora", "lokr"])
def test_an_sdxl_run_writes_sd_scripts_names_that_merge_to_what_it_trained(data, cache, tmp_path, kind):
    options = dict(OPTIONS, preset="tiny-sdxl", lora_save_format="kohya", lora_type=kind)
    run = trained_run(flags(data, cache, tmp_path, **options))
    file = tmp_path / "final" / "lora_kohya.safetensors"
    with safetensors.safe_open(file, framework="pt") as f:
        keys, header = list(f.keys()), f.metadata()
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys) and not any(
        "_down_blocks_" in k for k in keys
    )
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    base = build_components_xl("tiny-sdxl", seed=0)
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for (part, path), module in read_lycoris(str(file), base.unet.config).items():
            layer = getattr(merged, part).get_submodule(path)
            layer.weight.copy_(module.apply(layer.weight))
    trained = epsilon(run.parts.unet, sdxl=True)
    assert trained.sub(epsilon(base.unet, sdxl=True)).abs().max() > 1e-4
    assert torch.allclose(epsilon(merged.unet, sdxl=True), trained, rtol=1e-4, atol=1e-5)
    assert torch.allclose(
        text_states(merged.text_encoder_2), text_states(run.parts.text_encoder_2), atol=1e-5
    )
    pipe = TextToImageXLPipeline(**base.as_dict())
    pipe.load_lora_weights(str(file))  # a plain LoRA through our kohya reader, a LoKr merged
    assert torch.allclose(epsilon(pipe.unet, sdxl=True), trained, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "setting, words",
    [
        (dict(lora_type="lycoris"), "lora_type='lycoris': use lora, loha or lokr"),
        (
            dict(lora_type="loha", lora_dora="true"),
            "lora_dora with lora_type loha: DoRA is trained on lora_type",
        ),
        (
            dict(lora_type="lokr", lora_dropout=0.1),
            "lora_dropout with lora_type lokr: it is LoRA's; set it to 0",
        ),
    ],
)
def test_settings_no_adapter_kind_takes_fail_before_training(data, tmp_path, setting, words):
    with pytest.raises(ValueError, match=words):
        main(flags(data, tmp_path / "cache", tmp_path / "run", **dict(OPTIONS, **setting)))
    assert not (tmp_path / "cache").exists()
