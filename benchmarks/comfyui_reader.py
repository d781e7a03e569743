"""The trainer's LoRA, LoHa, LoKr and DoRA files in ComfyUI's own loader, against ours (issue 37).

Run by hand, not in CI: four steps, each its own process, one after the other (the SDXL steps peak
near 10 GB). The ComfyUI step runs in ComfyUI's own venv (benchmarks/comfyui_side.py; it imports
nothing of sdlite):

    .venv/bin/python benchmarks/comfyui_reader.py make --family sdxl --out runs/comfyui_sdxl
    .venv/bin/python benchmarks/comfyui_reader.py ours --out runs/comfyui_sdxl
    /tmp/comfy-venv/bin/python benchmarks/comfyui_side.py --comfyui /tmp/comfy --out runs/comfyui_sdxl
    .venv/bin/python benchmarks/comfyui_reader.py compare --out runs/comfyui_sdxl

make: a preset (``sd15`` or ``sdxl``, full size: ComfyUI tells SD 1.5 from SDXL by the shapes alone)
with random weights, written in float16 by ``save_single_file``; the four files written by the
trainer's writer (``sdlite.lycoris.save_lycoris``) from peft adapters put on by ``sdlite.lora.add_lora``
(the trainer's call; SDXL's second encoder adapted as the trainer does) on the U-Net's attention and
feed-forward projections, proj_in/proj_out and every ResNet's 3x3 conv1, and on every projection of
each text encoder (rank 4, alpha 3). Each adapter tensor is random and nonzero, then one factor per
module is scaled so that ||ΔW|| / ||W|| = ``--update`` (0.1: an update that shows without drowning
W); a DoRA's magnitude is ||W|| per output row times 1 + 0.05 N(0, 1).

ours: the checkpoint through ``load_single_file[_xl]`` (float16 storage, then float32), each file's
modules merged by ``LycorisModule.apply`` (what ``pipe.load_lycoris`` merges, without the copy of the
weights it replaces that the pipeline keeps), the U-Net's ε and the text encoders' outputs in float32
(``encode_ids_xl`` for SDXL: penultimate states and the pooled projection).

compare: ε and text-encoder outputs, relative L2 difference, ComfyUI's against ours per file.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

KINDS = {"lora": {}, "dora": {"dora": True}, "loha": {"kind": "loha"}, "lokr": {"kind": "lokr"}}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.2", "proj_in", "proj_out", "conv1")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
PROMPT = "a magenta square above a small teal circle, watercolour on rough paper"
SIZE = {"height": 1024, "width": 768, "crop_h": 16, "crop_w": 32}  # SDXL's size conditioning


def peak_gb() -> float:
    """Peak resident set, file pages included (a memory-mapped checkpoint counts here while read)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


class AnonPeak(threading.Thread):
    """The peak of RssAnon, the memory no file backs, sampled every 0.1 s."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.start()

    def run(self):
        while True:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 2**20)
            time.sleep(0.1)


ANON = None


def memory() -> dict[str, float]:
    """{"peak_rss_gb", "peak_anon_gb"} of this process so far."""
    global ANON
    ANON = ANON or AnonPeak()
    return {"peak_rss_gb": round(peak_gb(), 2), "peak_anon_gb": round(ANON.peak, 2)}


def log(msg: str) -> None:
    m = memory()
    print(f"[{time.strftime('%H:%M:%S')}] {msg} (peak RSS {m['peak_rss_gb']} GB, of it anonymous "
          f"{m['peak_anon_gb']} GB)", flush=True)  # fmt: skip


# ---- make (our venv) -------------------------------------------------------------------------------


def _random_fill(model: torch.nn.Module, seed: int) -> None:
    """Weights U(±1/sqrt(fan_in)) as torch's Linear/Conv init gives, norms 1 + 0.1 N, biases small:
    filled tensor by tensor in float16, so a full-size SDXL U-Net never exists in float32."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                bound = p[0].numel() ** -0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))


def _strip_adapters(model: torch.nn.Module) -> None:
    """Put each peft-wrapped layer's base layer back in its place and forget the adapter config."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if "peft_config" in model.__dict__:
        del model.peft_config
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = False


def _randomise(model: torch.nn.Module, part: str, update: float, g: torch.Generator) -> list[float]:
    """Every adapter tensor random, then one factor per module scaled so ||ΔW|| / ||W|| = update; a
    DoRA's magnitude set to ||W|| per row times 1 + 0.05 N. Returns each module's ||ΔW|| / ||W||."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    from sdlite.lora import named_adapter_parameters
    from sdlite.lycoris import peft_modules

    with torch.no_grad():
        for _, p in named_adapter_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))
        ratios = []
        for (_, path), m in peft_modules(model, part).items():
            layer = model.get_submodule(path)
            w = layer.get_base_layer().weight.float()
            c = update * w.norm() / m.delta().norm()
            if isinstance(layer, LoHaLayer):
                layer.hada_w1_a["default"].mul_(c)
            elif isinstance(layer, LoKrLayer):
                (layer.lokr_w1 if "default" in layer.lokr_w1 else layer.lokr_w1_a)["default"].mul_(c)
            else:
                layer.lora_B["default"].weight.mul_(c)
                if layer.use_dora.get("default"):
                    mag = layer.lora_magnitude_vector["default"].weight
                    rows = w.flatten(1).norm(dim=1).reshape(mag.shape)
                    mag.copy_(rows * (1 + 0.05 * torch.randn(mag.shape, generator=g)))
        for (_, path), m in peft_modules(model, part).items():
            w = model.get_submodule(path).get_base_layer().weight.float()
            ratios.append(float(m.delta().norm() / w.norm()))
    return ratios


def _random_models(family: str):
    """(unet, vae, text_encoder, text_encoder_2 or None, tokenizers) of the full-size preset, float16.
    SDXL's U-Net is built on the meta device and filled in float16 (13 GB in float32 otherwise)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdlite.models_xl import openclip_tokenizer
    from sdlite.presets import get_preset
    from sdlite.tokenizer import clip_tokenizer

    preset = get_preset(family)
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**preset.config("unet"))
    unet = unet.to(torch.float16).to_empty(device="cpu")
    _random_fill(unet, seed=1)
    vae = AutoencoderKL(**preset.config("vae")).half()
    te = CLIPTextModel(CLIPTextConfig(**preset.config("text_encoder"))).half()
    if family != "sdxl":
        return unet, vae, te, None, (clip_tokenizer(),)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**preset.config("text_encoder_2"))).half()
    return unet, vae, te, te2, (clip_tokenizer(), openclip_tokenizer())


def make(args) -> None:
    from peft import inject_adapter_in_model

    from pipelines.single_file import save_single_file
    from pipelines.single_file_xl import save_single_file_xl
    from sdlite.lora import LoraSettings, add_lora, cast_adapters_to_fp32
    from sdlite.lycoris import save_lycoris

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sdxl = args.family == "sdxl"
    unet, vae, te, te2, tokenizers = _random_models(args.family)
    log(f"{args.family} models built")
    ckpt = out / "model.safetensors"
    if sdxl:
        save_single_file_xl(unet, vae, te, te2, ckpt, dtype=torch.float16)
    else:
        save_single_file(unet, vae, te, ckpt, dtype=torch.float16)
    del vae
    log(f"checkpoint written: {ckpt} ({ckpt.stat().st_size / 2**30:.2f} GiB)")

    ids = {f"ids_{i}": tok(PROMPT, padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids for i, tok in enumerate(tokenizers)}  # fmt: skip
    g = torch.Generator().manual_seed(2)
    inputs = {
        "x": torch.randn(1, 4, 16, 16, generator=g),
        "t": torch.tensor([500.0]),
        "context": torch.randn(1, 77, unet.config.cross_attention_dim, generator=g),
        **ids,
    }
    if sdxl:
        inputs["pooled"] = torch.randn(1, 1280, generator=g)
    save_file(
        inputs,
        out / "inputs.safetensors",
        metadata={"family": args.family, **{k: str(v) for k, v in SIZE.items()}},
    )

    kinds = args.kinds.split(",")
    report = {"family": args.family, "update": args.update, "kinds": kinds}
    for kind in kinds:
        extra = KINDS[kind]
        settings = LoraSettings(rank=4, alpha=3.0, unet_targets=UNET_TARGETS, text_encoder=True,
                                text_encoder_targets=TEXT_TARGETS, **extra)  # fmt: skip
        torch.manual_seed(0)
        add_lora(unet, te, settings)  # the trainer's call (training/family.py), then SDXL's encoder 2
        models = {"unet": unet, "text_encoder": te}
        if sdxl:
            inject_adapter_in_model(settings.config(settings.text_encoder_targets), te2, "default")
            models["text_encoder_2"] = te2
        g = torch.Generator().manual_seed(3)
        ratios = []
        for part, model in models.items():
            cast_adapters_to_fp32(model)
            ratios += _randomise(model, part, args.update, g)
        file = save_lycoris(out / f"{kind}.safetensors", models, unet.config, base_model=args.family)
        with safe_open(file, "pt") as f:
            keys = list(f.keys())
        report[kind] = {
            "modules": len(ratios),
            "tensors": len(keys),
            "update_ratio": [min(ratios), max(ratios)],
        }
        log(
            f"{kind}: {len(ratios)} modules, {len(keys)} tensors, "
            f"||ΔW||/||W|| {min(ratios):.3f}-{max(ratios):.3f}"
        )
        for model in models.values():
            _strip_adapters(model)
    (out / "make.json").write_text(json.dumps(report, indent=2))


def made_kinds(out: Path) -> list[str]:
    return json.loads((out / "make.json").read_text()).get("kinds", list(KINDS))


# ---- ours (our venv) -------------------------------------------------------------------------------


def _load_ours(out: Path, family: str):
    if family == "sdxl":
        from pipelines.single_file_xl import load_single_file_xl

        return load_single_file_xl(out / "model.safetensors", "sdxl", torch_dtype=torch.float16)
    from pipelines.single_file import load_single_file

    return load_single_file(out / "model.safetensors", "sd15", torch_dtype=torch.float16)


@contextmanager
def _merged(models: dict, kind: str, out: Path, unet_config):
    """Each module of ``kind``'s file merged into ``models``, in float32, from the float16 weights the
    checkpoint holds (kept memory-mapped: file pages, not a copy), which come back afterwards."""
    from sdlite.lycoris import read_lycoris

    modules = read_lycoris(str(out / f"{kind}.safetensors"), unet_config) if kind != "base" else {}
    layers = [(models[part].get_submodule(path), m) for (part, path), m in modules.items() if part in models]
    with torch.no_grad():
        for layer, m in layers:
            layer.weight.copy_(m.apply(layer.weight))
    yield len(layers)
    with torch.no_grad():
        for layer, _ in layers:
            layer.weight.copy_(layer.checkpoint_weight)


def _float32(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.modules():
        if isinstance(getattr(layer, "weight", None), torch.Tensor):
            layer.checkpoint_weight = layer.weight.detach()  # float16, the checkpoint's memory-mapped pages
    return model.float()


def ours(args) -> None:
    from sdlite.conditioning_xl import add_time_ids, encode_ids_xl

    out = Path(args.out)
    with safe_open(out / "inputs.safetensors", "pt") as f:
        family = f.metadata()["family"]
    inputs = load_file(out / "inputs.safetensors")
    sdxl = family == "sdxl"
    results = {}
    parts = _load_ours(out, family)
    encoders = {"text_encoder": _float32(parts.text_encoder)}  # the U-Net stays float16 meanwhile
    if sdxl:
        encoders["text_encoder_2"] = _float32(parts.text_encoder_2)
    for kind in ("base", *made_kinds(out)):
        with _merged(encoders, kind, out, None) as n:
            with torch.no_grad():
                if sdxl:
                    states, pooled = encode_ids_xl(*encoders.values(), inputs["ids_0"], inputs["ids_1"])
                    results[f"{kind}.pooled"] = pooled.float()
                else:
                    states = encoders["text_encoder"](inputs["ids_0"])[0]
                results[f"{kind}.text"] = states.float()
        log(f"ours {kind}: text encoders, {n} modules merged")
    unet = parts.unet
    del parts, encoders  # the text encoders' float32 weights go before the U-Net's arrive
    unet = _float32(unet)
    extra = {}
    if sdxl:
        h, w, ch, cw = (SIZE[k] for k in ("height", "width", "crop_h", "crop_w"))
        time_ids = add_time_ids((h, w), (ch, cw), (h, w))[None]
        extra = {"added_cond_kwargs": {"text_embeds": inputs["pooled"], "time_ids": time_ids}}
    for kind in ("base", *made_kinds(out)):
        with _merged({"unet": unet}, kind, out, unet.config) as n:
            with torch.no_grad():
                eps = unet(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"], **extra).sample
            results[f"{kind}.eps"] = eps.float()
        log(f"ours {kind}: U-Net, {n} modules merged, |eps| {eps.norm():.4g}")
    save_file(results, out / "ours.safetensors", metadata={k: str(v) for k, v in memory().items()})


# ---- compare ---------------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def compare(args) -> None:
    out = Path(args.out)
    ours_ = load_file(out / "ours.safetensors")
    made = json.loads((out / "make.json").read_text())
    print(f"family {made['family']}, ||ΔW||/||W|| = {made['update']} per module")
    for name in ("comfy", "comfy_fp32te"):
        if not (out / f"{name}.safetensors").exists():
            continue
        theirs = load_file(out / f"{name}.safetensors")
        report = json.loads((out / f"{name}.json").read_text())
        print(f"\n{name}: ComfyUI detected {report['detected']}, text encoders {report['text_dtype']}, "
              f"peak RSS {report['peak_rss_gb']} GB")  # fmt: skip
        print(
            "| file | modules | keys not loaded | U-Net weights patched | ε relative | ε change vs base "
            "| text relative | pooled relative |"
        )
        for kind in ("base", *made_kinds(out)):
            eps = rel(theirs[f"{kind}.eps"], ours_[f"{kind}.eps"])
            change = rel(ours_[f"{kind}.eps"], ours_["base.eps"]) if kind != "base" else 0.0
            text = rel(theirs[f"{kind}.text"], ours_[f"{kind}.text"])
            pooled = (
                rel(theirs[f"{kind}.pooled"], ours_[f"{kind}.pooled"]) if f"{kind}.pooled" in ours_ else None
            )
            modules = made.get(kind, {}).get("modules", "-")
            print(
                f"| {kind} | {modules} | {len(report['not_loaded'][kind])} | {report['patched'][kind]} | "
                f"{eps:.2e} | {change:.3f} | {text:.2e} | {'-' if pooled is None else f'{pooled:.2e}'} |"
            )


def main(argv=None) -> None:
    log("start")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    m = sub.add_parser("make")
    m.add_argument("--family", choices=("sd15", "sdxl"), default="sdxl")
    m.add_argument("--update", type=float, default=0.1, help="||ΔW|| / ||W|| of every adapted module")
    m.add_argument("--kinds", default=",".join(KINDS), help="which files to write (default: all four)")
    for name in ("ours", "compare"):
        sub.add_parser(name)
    for s in sub.choices.values():
        s.add_argument("--out", required=True)
    args = p.parse_args(argv)
    {"make": make, "ours": ours, "compare": compare}[args.step](args)


if __name__ == "__main__":
    main()
