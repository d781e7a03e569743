"""LyCORIS files (LoHa, LoKr, DoRA) in kohya's key layout: each module's update equals what peft's
own LoHa, LoKr and DoRA layers compute from the same tensors; loaded into our pipelines merged, at
the layer it names (SDXL's SGM names too), given back bit for bit; bad files refused unchanged.

Tensors are random and small; every adapter's second factor is non-zero, so each update does something.
"""

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from PIL import Image

from pipelines import TextToImagePipeline, TextToImageXLPipeline
from sdlite.kohya_names import LoraFileError
from sdlite.lycoris import LycorisModule, read_lycoris
from sdlite.models import build_components
from sdlite.models_xl import build_components_xl

TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TE_Q = "encoder.layers.0.self_attn.q_proj"


class Layers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)


def _peft(config, layer: str):
    """(a peft-adapted layer with random adapter tensors, the plain layer, the tensors LyCORIS names)."""
    torch.manual_seed(0)
    plain = Layers()
    model = inject_adapter_in_model(config, copy.deepcopy(plain).requires_grad_(False))
    tensors = {"alpha": torch.tensor(4.0)}
    with torch.no_grad():
        for name, p in getattr(model, layer).named_parameters():
            if "default" not in name:
                continue
            p.add_(0.3 * torch.randn_like(p))
            key = name.split(".default")[0]
            lycoris = {
                "lora_A": "lora_down.weight",
                "lora_B": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale",
            }
            value = p.detach().clone()
            tensors[lycoris.get(key, key)] = value[:, None] if key == "lora_magnitude_vector" else value
    return getattr(model, layer), getattr(plain, layer), tensors


@pytest.mark.parametrize(
    "config, layer, kind",
    [
        (LoHaConfig(r=2, alpha=4, target_modules=["lin", "conv"]), "lin", "loha"),
        (LoHaConfig(r=2, alpha=4, target_modules=["lin", "conv"]), "conv", "loha"),
        (LoKrConfig(r=2, alpha=4, target_modules=["lin"]), "lin", "lokr"),  # w1 full, w2 = w2_a w2_b
        (LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["lin"]), "lin", "lora"),
    ],
    ids=["loha-linear", "loha-conv", "lokr-linear", "dora-linear"],
)
def test_each_kinds_update_gives_peft_layers_output(config, layer, kind):
    adapted, plain, tensors = _peft(config, layer)
    module = LycorisModule(kind, tensors)
    x = torch.randn(3, 64) if layer == "lin" else torch.randn(2, 8, 6, 6)
    weight = module.apply(plain.weight.detach())
    ours = F.linear(x, weight, plain.bias) if layer == "lin" else F.conv2d(x, weight, plain.bias, padding=1)
    with torch.no_grad():
        theirs, before = adapted(x), plain(x)
    assert (theirs - before).abs().max() > 1e-2  # the adapter does something
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def _loha(out: int, fan_in: int, rank: int, g) -> dict:
    return {f"hada_w{i}_{ab}": 0.3 * torch.randn((out, rank) if ab == "a" else (rank, fan_in), generator=g)
            for i in (1, 2) for ab in "ab"}  # fmt: skip


def _file(tmp_path, modules: dict) -> str:
    """A safetensors file of {kohya module name: {suffix: tensor}}."""
    tensors = {
        f"{name}.{suffix}": t.clone() for name, group in modules.items() for suffix, t in group.items()
    }
    safetensors.torch.save_file(tensors, tmp_path / "lycoris.safetensors")
    return str(tmp_path / "lycoris.safetensors")


def test_a_lycoris_file_merges_into_our_pipeline_where_it_says_and_unloads_exactly(tmp_path):
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    before = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("unet", "text_encoder")}  # fmt: skip
    g = torch.Generator().manual_seed(1)
    to_q, conv = pipe.unet.get_submodule(TO_Q).weight, pipe.unet.get_submodule(CONV).weight
    te_q = pipe.text_encoder.get_submodule(TE_Q).weight
    loha = _loha(to_q.shape[0], to_q.shape[1], 2, g) | {"alpha": torch.tensor(1.0)}
    dora = {
        "lora_down.weight": 0.3 * torch.randn(2, conv.shape[1], 3, 3, generator=g),
        "lora_up.weight": 0.3 * torch.randn(conv.shape[0], 2, 1, 1, generator=g),
        "dora_scale": conv.flatten(1).norm(dim=1)[:, None, None, None] * 1.5,  # per output row
        "alpha": torch.tensor(2.0),
    }
    side = int(te_q.shape[0] ** 0.5)  # LoKr: a (side x side) Kronecker factor twice, w2 factorised
    lokr = {
        "lokr_w1": torch.randn(side, side, generator=g),
        "lokr_w2_a": torch.randn(side, 2, generator=g),
        "lokr_w2_b": 0.1 * torch.randn(2, side, generator=g),
        "alpha": torch.tensor(1.0),
    }
    names = ["lora_unet_" + TO_Q, "lora_unet_" + CONV, "lora_te_text_model_" + TE_Q]
    file = _file(tmp_path, {n.replace(".", "_"): m for n, m in zip(names, (loha, dora, lokr))})
    pipe.load_lora_weights(file)
    h = {k: v.double() for k, v in loha.items()}  # by hand: W + (alpha / r)(w1_a w1_b) * (w2_a w2_b)
    expected = before["unet"][TO_Q + ".weight"].double() + 0.5 * (
        (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"])
    )
    assert torch.allclose(pipe.unet.get_submodule(TO_Q).weight.double(), expected, atol=1e-5)
    merged = pipe.unet.get_submodule(CONV).weight  # DoRA: each output row's norm is dora_scale
    assert torch.allclose(merged.flatten(1).norm(dim=1), dora["dora_scale"].flatten(), rtol=1e-5)
    kron = torch.kron(lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]) * 0.5
    assert torch.allclose(
        pipe.text_encoder.get_submodule(TE_Q).weight,
        before["text_encoder"][TE_Q + ".weight"] + kron,
        atol=1e-5,
    )
    pipe.unload_lora_weights()
    for name, saved in before.items():
        now = getattr(pipe, name).state_dict()
        assert all(torch.equal(now[k], v) for k, v in saved.items()), name


def test_sdxl_lycoris_files_with_sgm_names_load_on_the_layer_they_name(tmp_path):
    pipe = TextToImageXLPipeline(**build_components_xl("tiny-sdxl", seed=0).as_dict())
    weight = pipe.unet.get_submodule(TO_Q).weight.detach().clone()
    g = torch.Generator().manual_seed(2)
    loha = _loha(weight.shape[0], weight.shape[1], 2, g) | {"alpha": torch.tensor(2.0)}
    # tiny-sdxl has one ResNet a level: diffusers' down_blocks.1.attentions.0 is input_blocks.3.1
    pipe.load_lora_weights(
        _file(tmp_path, {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": loha})
    )
    delta = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"])
    assert torch.allclose(pipe.unet.get_submodule(TO_Q).weight, weight + delta, atol=1e-5)


def test_tucker_forms_broken_modules_and_other_models_files_are_refused_unchanged(tmp_path):
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_" + TO_Q.replace(".", "_")
    with pytest.raises(LoraFileError, match="hada_t1 is the Tucker form"):
        read_lycoris(
            {f"{name}.{k}": v for k, v in (_loha(8, 8, 2, g) | {"hada_t1": torch.zeros(2, 2, 3, 3)}).items()}
        )
    with pytest.raises(LoraFileError, match="has no lokr_w2 or lokr_w2_a and lokr_w2_b"):
        read_lycoris({f"{name}.lokr_w1": torch.zeros(2, 2), f"{name}.lokr_w2_a": torch.zeros(4, 2)})
    pipe = TextToImagePipeline(**build_components("tiny", seed=0).as_dict())
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    wide = _file(tmp_path, {name: _loha(640, 640, 2, g)})  # an SD 1.5-sized layer: not the tiny model's
    with pytest.raises(ValueError, match=r"640 -> 640 wide where this layer is .*nothing was loaded"):
        pipe.load_lora_weights(wide)
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in weights.items())


def test_sdlite_lora_inspect_says_what_a_file_is_and_whether_it_loads(tmp_path, capsys):
    from sdlite.cli import main as sdlite

    g = torch.Generator().manual_seed(4)
    loha = _loha(64, 64, 2, g) | {"alpha": torch.tensor(1.0)}
    lycoris = _file(tmp_path, {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": loha,
                               "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": loha})  # fmt: skip
    assert sdlite(["lora", "inspect", lycoris, "--model", "tiny-sdxl"]) == 0
    out = capsys.readouterr().out
    assert "LyCORIS (loha)" in out and "for: SDXL" in out and "modules: 2 (text_encoder_2 1, unet 1)" in out
    assert "rank: 2; alpha: 1" in out and "loads on tiny-sdxl: yes" in out
    assert sdlite(["lora", "inspect", lycoris, "--model", "tiny"]) == 0
    assert "loads on tiny: no, 1 of 2 modules" in capsys.readouterr().out  # SD has no text_encoder_2
    embedding = tmp_path / "<w>.safetensors"
    safetensors.torch.save_file({"emb_params": torch.randn(3, 64)}, embedding)
    assert sdlite(["lora", "inspect", str(embedding), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "embedding, the word '<w>'" in out and "vectors: 3" in out and "loads on tiny: yes" in out
    assert sdlite(["lora", "inspect", str(embedding), "--model", "tiny-sdxl"]) == 0
    assert "loads on tiny-sdxl: no" in capsys.readouterr().out


def test_sdlite_generate_merges_a_lycoris_file_at_its_scale(tmp_path):
    model = tmp_path / "model"
    components = build_components("tiny", seed=0)
    components.save_pretrained(model)
    to_q = components.unet.get_submodule(TO_Q).weight
    loha = _loha(to_q.shape[0], to_q.shape[1], 2, torch.Generator().manual_seed(4)) | {
        "alpha": torch.tensor(2.0)
    }
    file = _file(tmp_path, {"lora_unet_" + TO_Q.replace(".", "_"): loha})
    sdlite = str(Path(sys.executable).parent / "sdlite")

    def generate(*lora: str) -> np.ndarray:
        out = tmp_path / f"out{len(list(tmp_path.glob('out*.png')))}.png"
        argv = [sdlite, "generate", "a red circle", "--model", str(model), "--num_inference_steps", "2",
                "--out", str(out), *lora]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return np.asarray(Image.open(out), dtype=np.int16)

    base, none, some = generate(), generate("--lora", f"{file}:0"), generate("--lora", f"{file}:1")
    assert np.array_equal(base, none)  # at scale 0 the merged update is nothing
    assert np.abs(some - base).max() > 0  # at scale 1 it changes the image
