"""Does a LoRA fit a pipeline's models? Checked from the state dict before any weight is changed.

A LoRA adds B A to a layer W (Hu et al. 2021): A is (r, in) and B is (out, r), so each pair names a
layer, and its widths must be that layer's. An SD 1.x LoRA loaded into SDXL (or the reverse) names
layers the other model lacks or reads other widths (cross-attention: 768 features for SD 1.x, 2048
for SDXL), and SDXL LoRAs may adapt a second text encoder SD 1.x does not have. peft would fail
half-way through injecting (or silently skip layers), so we compare first and name what was found.
"""

from __future__ import annotations

import torch

SIDES = {  # how a key ends -> which width of the layer its matrix carries (dim 1 of A, dim 0 of B)
    ".lora_A.weight": "in", ".lora_B.weight": "out", ".lora.down.weight": "in", ".lora.up.weight": "out",
    ".lora_linear_layer.down.weight": "in", ".lora_linear_layer.up.weight": "out",
}  # fmt: skip


def layer_named(model: torch.nn.Module, name: str):
    """The layer ``name`` names, or None; transformers >= 5 dropped CLIPTextModel's ``text_model.``
    (not CLIPTextModelWithProjection's)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            layer = model.get_submodule(candidate)
        except AttributeError:
            continue
        return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return None


def _widths(layer) -> tuple[int, int] | None:
    if isinstance(layer, torch.nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, torch.nn.Conv2d):
        return layer.in_channels, layer.out_channels
    return None


def check_lora_fits(state: dict[str, torch.Tensor], models: dict, kind: str) -> None:
    """Raise ValueError, naming what the LoRA was made for and what this model is, unless every
    ``<part>.<layer>.lora_*`` tensor in ``state`` has a layer of that name and width in ``models[part]``."""
    parts = sorted({key.split(".", 1)[0] for key in state})
    foreign = [p for p in parts if models.get(p) is None and any(k.endswith(tuple(SIDES)) for k in state
                                                                 if k.startswith(p + "."))]  # fmt: skip
    missing, misfit = [], []
    for key, tensor in state.items():
        part, _, rest = key.partition(".")
        side = next((s for s in SIDES if rest.endswith(s)), None)
        if side is None or part in foreign:
            continue
        layer = layer_named(models[part], rest[: -len(side)])
        widths = _widths(layer) if layer is not None else None
        if widths is None:
            missing.append(key)
            continue
        want = widths[0] if SIDES[side] == "in" else widths[1]
        got = tensor.shape[1] if SIDES[side] == "in" else tensor.shape[0]
        if got != want:
            misfit.append(f"{key} has {got} {SIDES[side]}put features where this {kind} layer has {want}")
    if not (foreign or missing or misfit):
        return
    found = []
    if foreign:
        found.append(f"weights for {foreign}, which this {kind} pipeline does not have (it has "
                     f"{sorted(k for k, v in models.items() if v is not None)})")  # fmt: skip
    if missing:
        found.append(f"{len(missing)} layers this model lacks, e.g. {missing[0]!r}")
    if misfit:
        found.append(f"{len(misfit)} matrices of other widths, e.g. {misfit[0]}")
    made_for = (
        "SDXL (it adapts text_encoder_2)" if "text_encoder_2" in parts else "a model with one text encoder"
    )
    cross = [
        t.shape[1]
        for k, t in state.items()
        if ".attn2.to_k." in k and SIDES.get(k[k.index(".lora") :]) == "in"
    ]
    if cross:
        made_for += f", whose cross-attention reads {cross[0]}-wide text states"
    unet = models.get("unet")
    have = f" (cross-attention width {unet.config.cross_attention_dim})" if unet is not None else ""
    raise ValueError(
        f"this LoRA does not fit the {kind} model{have}: it has {'; '.join(found)}. It looks made for "
        f"{made_for}. Load it into a pipeline of the model it was trained on; nothing was loaded"
    )
