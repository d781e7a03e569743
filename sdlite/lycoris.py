"""LyCORIS files (LoHa, LoKr, DoRA) in kohya's key layout: each module's exact weight update.

Module names are kohya's (``lora_unet_...``, ``lora_te1_...``; ``sdlite.kohya`` places them, SDXL's
SGM block names included); what follows the name says the kind, with ``.alpha`` beside each:

    LoRA  lora_down.weight A (r, in), lora_up.weight B (out, r)      ΔW = (alpha / r) B A
    LoHa  hada_w1_a (out, r), hada_w1_b (r, in), hada_w2_a, hada_w2_b
          ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b)     (Hyeon-Woo et al. 2022, FedPara: a Hadamard
          product of two rank-r matrices reaches rank r²)
    LoKr  lokr_w1 or lokr_w1_a lokr_w1_b, lokr_w2 or lokr_w2_a lokr_w2_b
          ΔW = scale · (w1 ⊗ w2), a Kronecker product (Yeh et al. 2023, LyCORIS); scale = alpha / r
          when a factor is factorised (r its inner width), 1 when both are full (nothing to scale by)
    DoRA  any of the above and dora_scale m (Liu et al. 2024): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm
          per output row when m is (out, 1) (peft's, LyCORIS' wd_on_output, what we write), per input
          column when m is (1, in) (LyCORIS before 3.2); which readers apply which: docs/interop.md

A convolution's weight (out, in, kh, kw) is the same update on (out, in·kh·kw), reshaped. The Tucker
forms (``hada_t1``, ``lokr_t2``, ``lora_mid``) are refused by name. Applying the update to the weight
itself is exact for every kind and is what A1111 and ComfyUI do; the pipelines keep the weights it
replaced, to give them back.

Writing (``save_lycoris``) is the inverse, for adapters trained with peft: each of peft's LoRA, DoRA,
LoHa and LoKr layers becomes the module above whose update is the same, its scale given as the alpha
the formulas divide (a LoKr of two full factors, which no alpha scales, gets peft's scale in w2).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdlite.kohya import kohya_header, kohya_name, load_lora_file, save_atomically, sdlite_header
from sdlite.kohya_names import LoraFileError, model_path, place_module

LORA = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
TUCKER = ("hada_t1", "hada_t2", "lokr_t2", "lora_mid.weight")
COMMON = ("alpha", "dora_scale")
LYCORIS_MARKS = re.compile(r"\.(hada_|lokr_|dora_scale$)")


def is_lycoris(keys) -> bool:
    """Whether tensor names are a LyCORIS file's: LoHa, LoKr, or DoRA's ``dora_scale``."""
    return any(LYCORIS_MARKS.search(k) for k in keys)


@dataclass
class LycorisModule:
    """One module's tensors by suffix (``hada_w1_a``...) and its kind: "lora", "loha" or "lokr"."""

    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def alpha(self) -> float | None:
        alpha = self.tensors.get("alpha")
        return None if alpha is None else float(alpha.item())

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.tensors

    @property
    def rank(self) -> int | None:
        """The inner width r that alpha divides; None for a LoKr of two full factors (of a LoKr with
        both factorised, w2's, as ComfyUI reads it)."""
        t = self.tensors
        if self.kind == "lora":
            return int(t["lora_down.weight"].shape[0])
        if self.kind == "loha":
            return int(t["hada_w1_b"].shape[0])
        inner = t.get("lokr_w2_b", t.get("lokr_w1_b"))
        return None if inner is None else int(inner.shape[0])

    def scale(self) -> float:
        rank, alpha = self.rank, self.alpha
        if rank is None:
            return 1.0
        return (alpha if alpha is not None else rank) / rank

    def widths(self) -> tuple[int, int]:
        """(in, out) of the layer; in counts in·kh·kw for a convolution."""
        d = self.delta()
        return d[0].numel(), d.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW (out, in) or (out, in, kh, kw), alpha's scale included (the formulas at the top)."""
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.kind == "lora":
            down, up = t["lora_down.weight"], t["lora_up.weight"]
            d = up.flatten(1) @ down.flatten(1)
            return self.scale() * (d.reshape(up.shape[0], *down.shape[1:]) if down.ndim == 4 else d)
        if self.kind == "loha":
            w1 = t["hada_w1_a"] @ t["hada_w1_b"].flatten(1)
            w2 = t["hada_w2_a"] @ t["hada_w2_b"].flatten(1)
            d = w1 * w2
            b = t["hada_w1_b"]
            return self.scale() * (d.reshape(d.shape[0], *b.shape[1:]) if b.ndim == 4 else d)
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        else:
            b = t["lokr_w2_b"]
            w2 = (t["lokr_w2_a"] @ b.flatten(1)).reshape(t["lokr_w2_a"].shape[0], *b.shape[1:])
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        return self.scale() * torch.kron(w1, w2)

    def apply(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The new weight: W + strength ΔW, or DoRA's W' (moved ``strength`` of the way from W)."""
        base = weight.float()
        delta = self.delta().reshape(base.shape)
        if not self.dora:
            return (base + strength * delta).to(weight.dtype)
        merged = base + delta
        m = self.tensors["dora_scale"].float()
        if m.shape[0] == base.shape[0] and m.numel() == base.shape[0]:  # per output row
            norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (base.ndim - 1))
            m = m.reshape(norm.shape)
        else:  # per input column: (1, in[, kh, kw])
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (base.ndim - 2))
            m = m.reshape(norm.shape)
        dora = m * merged / norm
        return (base + strength * (dora - base)).to(weight.dtype)


def _kind(name: str, group: dict) -> str:
    tucker = [s for s in TUCKER if s in group]
    if tucker:
        raise LoraFileError(f"{name}: {tucker[0]} is the Tucker form of LyCORIS, which sdlite does not read")
    kinds = [k for k, ns in (("lora", LORA), ("loha", LOHA), ("lokr", LOKR)) if any(n in group for n in ns)]
    if len(kinds) != 1:
        raise LoraFileError(f"{name}: holds {sorted(group)}, not one LoRA, LoHa or LoKr module")
    need = {"lora": LORA, "loha": LOHA}.get(kinds[0], ())
    missing = [n for n in need if n not in group]
    if kinds[0] == "lokr":
        missing = [f"{w} or {w}_a and {w}_b" for w in ("lokr_w1", "lokr_w2")
                   if w not in group and not {f"{w}_a", f"{w}_b"} <= group.keys()]  # fmt: skip
    if missing:
        raise LoraFileError(f"{name}: has no {', '.join(missing)}")
    return kinds[0]


def read_lycoris(source, unet_config=None) -> dict[tuple[str, str], LycorisModule]:
    """{(part, module path in the model): LycorisModule} of a LyCORIS file (a path) or state dict."""
    tensors = source if isinstance(source, dict) else load_lora_file(source)[0]
    groups: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        known = suffix in LORA + LOHA + LOKR + TUCKER + COMMON
        if not known:
            raise LoraFileError(f"{key!r}: not a LoRA, LoHa, LoKr or DoRA tensor name")
        groups.setdefault(name, {})[suffix] = value
    modules = {}
    for name, group in sorted(groups.items()):
        module = LycorisModule(_kind(name, group), group)
        width_in, width_out = module.widths()
        modules[place_module(name, width_in, width_out, unet_config)] = module
    return modules


# ---- writing: peft's adapters as a LyCORIS file ------------------------------------------------------


def peft_modules(model: torch.nn.Module, part: str, adapter_name: str = "default") -> dict:
    """{(part, module path): LycorisModule} of ``model``'s adapted layers (peft's LoRA, DoRA, LoHa or
    LoKr), each with the update peft's layer adds; the tensors are the model's, detached."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer
    from peft.tuners.lora import LoraLayer

    modules = {}
    for path, layer in model.named_modules():
        if isinstance(layer, (LoraLayer, LoHaLayer, LoKrLayer)) and adapter_name in layer.scaling:
            modules[(part, path)] = _peft_module(layer, adapter_name, path)
    return modules


def _peft_module(layer, a: str, path: str) -> LycorisModule:
    """One peft layer's adapter ``a`` as a LycorisModule; alpha = scale * r, so alpha / r is peft's scale."""
    from peft.tuners.loha import LoHaLayer
    from peft.tuners.lokr import LoKrLayer

    scale, weight = float(layer.scaling[a]), layer.get_base_layer().weight
    tensors = {
        name: param[a]
        for name in layer.adapter_layer_names
        if isinstance(param := getattr(layer, name), torch.nn.ParameterDict) and a in param
    }  # fmt: skip  (LoHa's and LoKr's factors; LoRA keeps its in modules)
    if any(name in TUCKER for name in tensors):
        raise LoraFileError(f"{path}: peft's effective-conv (Tucker) form, which sdlite does not write")
    if isinstance(layer, LoHaLayer):
        kind, alpha = "loha", scale * layer.r[a]
    elif isinstance(layer, LoKrLayer):
        kind, inner = "lokr", tensors.get("lokr_w2_b", tensors.get("lokr_w1_b"))
        if inner is None:  # two full factors: the file has no r to scale by
            tensors["lokr_w2"], alpha = tensors["lokr_w2"] * scale, 1.0
        else:
            alpha = scale * inner.shape[0]
    else:
        kind, alpha = "lora", scale * layer.r[a]
        tensors = {"lora_down.weight": layer.lora_A[a].weight, "lora_up.weight": layer.lora_B[a].weight}
        if layer.use_dora.get(
            a
        ):  # peft's magnitude is per output row: (out,), a convolution's (1, out, 1, 1)
            m = layer.lora_magnitude_vector[a].weight
            tensors["dora_scale"] = m.reshape(weight.shape[0], *[1] * (weight.ndim - 1))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return LycorisModule(kind, tensors | {"alpha": torch.tensor(alpha, dtype=torch.float32)})


def lycoris_tensors(modules: dict, unet_config) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header) of ``modules`` in kohya's key layout; names (SDXL's SGM block names included)
    are for the model whose U-Net ``unet_config`` is (None: SD's, or SDXL 1.0's for an SDXL file)."""
    if unet_config is not None:
        sdxl = unet_config.get("addition_embed_type") == "text_time"
    else:  # as sdlite.kohya.is_sdxl: a second encoder, or cross-attention to SDXL's 2048-wide states
        sdxl = any(part == "text_encoder_2" or (path.endswith("attn2.to_k") and m.widths()[0] == 2048)
                   for (part, path), m in modules.items())  # fmt: skip
    kinds = sorted({"dora" if m.dora else m.kind for m in modules.values()})
    plain = kinds == ["lora"]
    header = kohya_header("networks.lora" if plain else "lycoris.kohya", sdxl)
    header["ss_network_args"] = json.dumps({"algo": kinds[0] if len(kinds) == 1 else kinds})
    tensors = {}
    for (part, module), m in modules.items():
        name = kohya_name(part, module, *m.widths(), sdxl, unet_config)
        tensors |= {f"{name}.{suffix}": t for suffix, t in m.tensors.items()}
    return tensors, header


def save_lycoris(
    file: str | Path, models: dict, unet_config, base_model: str | None = None, adapter_name: str = "default"
) -> Path:
    """Write the adapters of ``models`` ({part: peft-adapted model}) to ``file`` as a LyCORIS file that
    ``read_lycoris``, ComfyUI and A1111 read; returns ``file``."""
    modules = {}
    for part, model in models.items():
        modules |= peft_modules(model, part, adapter_name)
    if not modules:
        raise LoraFileError(f"no adapter named {adapter_name!r} in {', '.join(models)}")
    tensors, header = lycoris_tensors(modules, unet_config)
    base = None if base_model is None else str(base_model)
    return save_atomically(tensors, {**sdlite_header(base), **header}, file)


# ---- a DoRA between diffusers' layout and LyCORIS' ----------------------------------------------------

MAGNITUDE = ".lora_magnitude_vector"  # peft's DoRA magnitude in a diffusers-layout file (+ ".weight")


def is_dora_file(tensors: dict) -> bool:
    """Whether a LoRA file's tensors are a DoRA's: diffusers' magnitudes, or LyCORIS' ``dora_scale``."""
    return any(MAGNITUDE in k or k.endswith(".dora_scale") for k in tensors)


def dora_from_diffusers(tensors: dict, header: dict) -> dict:
    """{(part, module path): LycorisModule} of a diffusers-layout DoRA, alpha from each part's config."""
    from sdlite.kohya import ADAPTER_METADATA_KEY, modules_from_diffusers

    magnitudes = {}
    for key, value in tensors.items():
        if MAGNITUDE in key:
            part, module = key.removesuffix(".weight").removesuffix(MAGNITUDE).split(".", 1)
            magnitudes[(part, model_path(part, module))] = value
    plain = {k: v for k, v in tensors.items() if MAGNITUDE not in k}
    configs = json.loads(header.get(ADAPTER_METADATA_KEY, "{}"))  # use_dora dropped: the magnitudes are here
    configs = {k: v for k, v in configs.items() if not k.endswith(".use_dora")}
    header = {**header, ADAPTER_METADATA_KEY: json.dumps(configs)}
    modules = {}
    for place, m in modules_from_diffusers(plain, header).items():
        t = {"lora_down.weight": m.down, "lora_up.weight": m.up, "alpha": torch.tensor(m.alpha)}
        if place in magnitudes:  # peft's (out,) or a convolution's (1, out, 1, 1): (out, 1[, 1, 1]) here
            t["dora_scale"] = magnitudes[place].reshape(m.up.shape[0], *[1] * (m.down.ndim - 1))
        modules[place] = LycorisModule("lora", t)
    return modules


def dora_to_diffusers(modules: dict) -> tuple[dict, dict]:
    """(tensors, header) of a LyCORIS DoRA in diffusers' layout: peft's LoraConfig with use_dora per part,
    its magnitudes under peft's names (a text encoder's with ``.weight``, where transformers looks)."""
    from sdlite.kohya import ADAPTER_METADATA_KEY, LoraModule, to_diffusers

    lora = {}
    for place, m in modules.items():
        if m.kind != "lora":
            raise LoraFileError(f"{place[0]}.{place[1]}: a {m.kind}, which diffusers does not read")
        if m.dora and m.tensors["dora_scale"].shape[0] != m.widths()[1]:
            raise LoraFileError(f"{place[0]}.{place[1]}: a per-input-column DoRA, which peft cannot hold")
        t = m.tensors
        lora[place] = LoraModule(t["lora_down.weight"], t["lora_up.weight"], m.scale() * m.rank)
    tensors, header = to_diffusers(lora)
    for (part, path), m in modules.items():
        if m.dora:
            scale = m.tensors["dora_scale"].flatten()
            conv = m.tensors["lora_down.weight"].ndim == 4
            suffix = ".weight" if part.startswith("text_encoder") else ""
            tensors[f"{part}.{path}{MAGNITUDE}{suffix}"] = scale.reshape(1, -1, 1, 1) if conv else scale
    configs = json.loads(header[ADAPTER_METADATA_KEY])
    configs |= {f"{part}.use_dora": True for part, _ in modules}
    return tensors, {ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}


def convert_dora(tensors: dict, header: dict, out: Path, to: str, unet_config, base_model) -> Path:
    """Write a DoRA file (either layout) in layout ``to``: LyCORIS' kohya keys, or diffusers'."""
    modules = dora_from_diffusers(tensors, header) if to == "kohya" else read_lycoris(tensors, unet_config)
    new, extra = lycoris_tensors(modules, unet_config) if to == "kohya" else dora_to_diffusers(modules)
    return save_atomically(new, {**sdlite_header(base_model), **extra}, out)
