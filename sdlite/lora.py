"""LoRA adapters for the U-Net and text encoder, through peft, in the file layout diffusers reads.

LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes a linear layer's weight W and learns
a low-rank update: ``W' = W + (alpha / r) * B @ A`` with A of shape (r, in) and B of shape (out, r).
peft puts the A and B matrices beside the projections we name (``target_modules``); this module only
chooses those targets, keeps the base frozen, and reads and writes adapter files.

The file is diffusers' ``pytorch_lora_weights.safetensors``: keys ``unet.<module>.lora_A.weight`` /
``text_encoder.<module>.lora_B.weight`` (peft's names under one prefix per part), and in the
safetensors header the ``LoraConfig`` of each part under ``lora_adapter_metadata``, which is where
diffusers' ``load_lora_weights`` finds ``r`` and ``lora_alpha``. Without that header diffusers would
assume ``alpha == r`` and an adapter trained with another alpha would load at the wrong strength. We
add one key of our own, ``sdlite``, naming the base model; diffusers ignores it.

Inference uses diffusers' ``StableDiffusionLoraLoaderMixin`` on the pipeline (``load_lora_weights``,
``set_adapters``, ``fuse_lora``, ``cross_attention_kwargs={"scale": s}``); this module is the
training side: ``add_lora``, ``lora_param_groups``, ``cast_adapters_to_fp32``, ``AdapterWeights``
(what a training checkpoint holds), ``save_lora`` and ``load_lora_into`` (an adapter file into bare
models: to evaluate it, or to train it further from a fresh run), plus ``adapter_scale``, the
run-time strength that a pipeline's ``cross_attention_kwargs={"scale": s}`` sets.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY, LORA_WEIGHT_NAME_SAFE
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.loha import LoHaLayer
from peft.tuners.lokr import LoKrLayer
from peft.tuners.lora import LoraLayer
from peft.tuners.lycoris_utils import LycorisLayer
from peft.utils import get_peft_model_state_dict

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the U-Net's self- and cross-attention projections
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # CLIP's self-attention projections
SDLITE_METADATA_KEY = "sdlite"
# LoRA; LoHa and LoKr, LyCORIS' Hadamard and Kronecker forms (sdlite.lycoris)
KINDS = ("lora", "loha", "lokr")
# Every kind's trained tensors in peft's layers (DoRA's magnitude is LoRA's lora_magnitude_vector).
ADAPTER_TENSORS = (
    LoraLayer.adapter_layer_names + LoHaLayer.adapter_layer_names + LoKrLayer.adapter_layer_names
)


@dataclass
class LoraSettings:
    rank: int = 4
    alpha: float | None = None  # None means alpha = rank: the update is added at scale 1
    dropout: float = 0.0
    unet_targets: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = False  # also adapt the text encoder
    text_encoder_targets: tuple[str, ...] = TEXT_ENCODER_TARGETS
    kind: str = "lora"  # one of KINDS
    dora: bool = False  # DoRA (Liu et al. 2024): LoRA plus a trained magnitude per output row

    def config(self, targets: tuple[str, ...]) -> LoraConfig | LoHaConfig | LoKrConfig:
        """peft's config of this kind. Each starts at a zero update (LoRA's B, LoHa's w2_b, LoKr's w1
        are zeros), so a new adapter changes nothing; r and alpha mean the same in all three: the
        update is scaled by alpha / r."""
        alpha = self.alpha if self.alpha is not None else self.rank
        if self.kind == "loha":
            return LoHaConfig(r=self.rank, alpha=alpha, target_modules=list(targets))
        if self.kind == "lokr":
            return LoKrConfig(r=self.rank, alpha=alpha, target_modules=list(targets))
        if self.kind != "lora":
            raise ValueError(f"unknown adapter kind {self.kind!r}: choose one of {', '.join(KINDS)}")
        return LoraConfig(
            r=self.rank, lora_alpha=alpha, lora_dropout=self.dropout, target_modules=list(targets),
            use_dora=self.dora,
        )  # fmt: skip


def targets_found(model: torch.nn.Module, targets: Sequence[str]) -> bool:
    """Whether peft would put an adapter on ``model`` for ``targets``: a module named as one of them, or
    whose dotted name ends in one (``to_out.0`` is ``...attn1.to_out.0``)."""
    return any(n == t or n.endswith("." + t) for n, _ in model.named_modules() for t in targets)


def target_problems(settings: LoraSettings, unet, text_encoders: Mapping[str, torch.nn.Module]) -> list[str]:
    """The target lists that name no module of their model. peft says so only when the adapter is added,
    which a training run does after caching its data (and DreamBooth's class images): ask this first."""
    problems = []
    if not targets_found(unet, settings.unet_targets):
        problems.append(f"the U-Net has none of the adapter's target modules {list(settings.unet_targets)}")
    for name, encoder in text_encoders.items() if settings.text_encoder else ():
        if not targets_found(encoder, settings.text_encoder_targets):
            layers = getattr(encoder.config, "num_hidden_layers", "?")  # 0 layers: no attention at all
            targets = list(settings.text_encoder_targets)
            problems.append(f"{name} ({layers} layers) has none of the adapter's target modules {targets}")
    return problems


def add_lora(unet, text_encoder=None, settings: LoraSettings | None = None, adapter_name: str = "default"):
    """Freeze both models and put a trainable adapter on the U-Net (and the text encoder if asked).

    The text encoder is frozen whether or not it gets an adapter: a LoRA fine-tune never trains its
    base weights. The adapters take the dtype of the layer they wrap; call ``cast_adapters_to_fp32``
    after this when the base is in half precision.
    """
    settings = settings or LoraSettings()
    unet.requires_grad_(False)
    unet.add_adapter(settings.config(settings.unet_targets), adapter_name=adapter_name)
    if text_encoder is not None:
        text_encoder.requires_grad_(False)
        if settings.text_encoder:
            # What transformers' ``add_adapter`` does, minus its peft version gate: transformers 5.x
            # asks for peft >= 0.22 there, a release newer than some installs have.
            inject_adapter_in_model(
                settings.config(settings.text_encoder_targets), text_encoder, adapter_name
            )
    elif settings.text_encoder:
        raise ValueError("LoraSettings.text_encoder is true but no text encoder was passed to add_lora")


def named_adapter_parameters(model, adapter_name: str = "default") -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of one adapter's trained tensors (LoRA's A and B, DoRA's magnitude, LoHa's and
    LoKr's factors); empty when ``model`` is None or has none."""
    if model is None:
        return []
    keys = tuple(f".{tensor}.{adapter_name}" for tensor in ADAPTER_TENSORS)
    return [
        (name, p)
        for name, p in model.named_parameters()
        if any(k + "." in name or name.endswith(k) for k in keys)  # LoRA's A ends in .weight, LoHa's not
    ]


def adapter_parameters(model, adapter_name: str = "default") -> list[torch.nn.Parameter]:
    """The trained tensors of one adapter; empty when ``model`` is None or has no such adapter."""
    return [p for _, p in named_adapter_parameters(model, adapter_name)]


def lora_param_groups(
    unet,
    text_encoder=None,
    unet_lr: float = 1e-4,
    text_encoder_lr: float | None = None,
    adapter_name: str = "default",
    text_encoder_2=None,
) -> list[dict]:
    """Optimizer param groups: the U-Net adapter at ``unet_lr``, the text encoders' (SDXL's second one
    too) at their own rate.

    ``text_encoder_lr`` defaults to ``unet_lr``. A part without an adapter gives no group.
    """
    te_lr = text_encoder_lr if text_encoder_lr is not None else unet_lr
    groups = [{"params": adapter_parameters(unet, adapter_name), "lr": unet_lr}]
    for encoder in (text_encoder, text_encoder_2):
        groups.append({"params": adapter_parameters(encoder, adapter_name), "lr": te_lr})
    return [g for g in groups if g["params"]]


class AdapterWeights(torch.nn.Module):
    """A module whose parameters are one adapter's tensors in ``model`` (A and B...), shared, not copied.

    Its ``state_dict`` is what a LoRA checkpoint needs of the model (megabytes, not the frozen base),
    and ``load_state_dict`` writes into the model's adapter in place, so the optimizer's references
    stay valid. Names are peft's with "/" for "." (a parameter name may not contain dots).
    """

    def __init__(self, model, adapter_name: str = "default"):
        super().__init__()
        self.adapter = torch.nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in named_adapter_parameters(model, adapter_name)}
        )
        if not len(self.adapter):
            raise ValueError(f"{type(model).__name__} has no adapter named {adapter_name!r}")


def cast_adapters_to_fp32(model, adapter_name: str = "default") -> None:
    """Keep the adapter in fp32 while the frozen base stays in fp16/bf16.

    Adam's updates on a small learning rate vanish when rounded to half precision, so the weights the
    optimizer owns stay fp32. peft's LoRA layer casts its input to the adapter's dtype and the
    result back to the base layer's, so the forward pass needs nothing else.
    """
    for p in adapter_parameters(model, adapter_name):
        p.data = p.data.float()


@contextmanager
def adapter_scale(*models, scale: float | None):
    """Multiply the strength of every active adapter in ``models`` by ``scale`` inside the block.

    What ``cross_attention_kwargs={"scale": s}`` means in diffusers' pipelines, for the U-Net and
    the text encoder alike. Afterwards each layer gets back the exact scaling it had, where
    diffusers' ``unscale_lora_layers`` divides by ``s`` (and after ``s = 0`` resets every adapter to
    weight 1, dropping the weights ``set_adapters`` gave). None or 1 changes nothing.
    """
    if scale is None or scale == 1:
        yield
        return
    kinds = (LoraLayer, LycorisLayer)  # LoRA and DoRA; LoHa and LoKr
    layers = [m for model in models if model is not None for m in model.modules() if isinstance(m, kinds)]
    saved = [dict(layer.scaling) for layer in layers]
    for layer in layers:
        layer.scale_layer(scale)
    try:
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.update(scaling)


def _has_adapter(model, adapter_name: str) -> bool:
    return model is not None and adapter_name in (getattr(model, "peft_config", None) or {})


def _adapter_config(model, adapter_name: str) -> dict:
    config = model.peft_config[adapter_name].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # sets are not JSON


def adapter_kind(model, adapter_name: str = "default") -> str:
    """The kind of ``model``'s adapter: "lora", "dora" (LoRA with use_dora), "loha" or "lokr"."""
    config = model.peft_config[adapter_name]
    if isinstance(config, (LoHaConfig, LoKrConfig)):
        return "loha" if isinstance(config, LoHaConfig) else "lokr"
    return "dora" if config.use_dora else "lora"


def adapter_state_dict(model, part: str, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """peft's state dict of one adapter (its name dropped from the keys), as diffusers' loader reads it
    into ``part``: a text encoder's DoRA magnitudes named ``lora_magnitude_vector.weight``, which is
    where transformers' adapter loading looks (without ``.weight`` it leaves them at their fresh
    value, and the loaded encoder computes another function); the U-Net's keep peft's names."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    if part.startswith("text_encoder"):
        state = {k + ".weight" if k.endswith(".lora_magnitude_vector") else k: v for k, v in state.items()}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_lora(
    path: str | Path,
    unet,
    text_encoder=None,
    adapter_name: str = "default",
    base_model: str | None = None,
    format: str = "diffusers",
) -> Path:
    """Write ``path/pytorch_lora_weights.safetensors``, the file ``pipeline.load_lora_weights(path)`` reads.

    The text encoder's adapter is written when it has one named ``adapter_name``. Pass models
    unwrapped from accelerate / DDP. ``base_model`` (a folder or a name) is recorded in the header.
    ``format="kohya"`` also writes ``path/lora_kohya.safetensors`` in kohya's layout (A1111, ComfyUI),
    each module with its alpha (``sdlite.kohya``; a DoRA's with its ``dora_scale``, ``sdlite.lycoris``),
    and returns that file. A LoHa or LoKr, which diffusers does not read, is written as that file alone,
    whatever ``format`` says (sdlite's pipelines load it from ``path`` too).
    """
    if format not in ("diffusers", "kohya"):
        raise ValueError(f"unknown LoRA file format {format!r}: choose 'diffusers' or 'kohya'")
    from sdlite.kohya import KOHYA_WEIGHT_NAME, convert_lora_file
    from sdlite.lycoris import save_lycoris

    models = {
        p: m for p, m in (("unet", unet), ("text_encoder", text_encoder)) if _has_adapter(m, adapter_name)
    }
    if not models:
        raise ValueError(f"neither the U-Net nor the text encoder has an adapter named {adapter_name!r}")
    path = Path(path)
    kind = adapter_kind(next(iter(models.values())), adapter_name)
    if kind in ("loha", "lokr"):
        return save_lycoris(path / KOHYA_WEIGHT_NAME, models, unet.config, base_model, adapter_name)
    tensors, configs = {}, {}
    for prefix, model in models.items():
        state = adapter_state_dict(model, prefix, adapter_name)
        tensors.update({f"{prefix}.{k}": v for k, v in state.items()})
        configs.update({f"{prefix}.{k}": v for k, v in _adapter_config(model, adapter_name).items()})
    header = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True),
        SDLITE_METADATA_KEY: json.dumps({"base_model": None if base_model is None else str(base_model)}),
    }
    path.mkdir(parents=True, exist_ok=True)
    file = path / LORA_WEIGHT_NAME_SAFE
    safetensors.torch.save_file(tensors, file, metadata=header)
    kohya_file = path / KOHYA_WEIGHT_NAME  # SDXL's U-Net blocks get the names of this U-Net's shape
    if format == "kohya" and kind == "dora":  # kohya's LoRA layout has no magnitude: LyCORIS' has
        return save_lycoris(kohya_file, models, unet.config, base_model, adapter_name)
    if format == "kohya":  # from the file just written, so both files hold the same adapter
        return convert_lora_file(file, kohya_file, to="kohya", overwrite=True, unet_config=unet.config)
    return file


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    return path / LORA_WEIGHT_NAME_SAFE if path.is_dir() else path


def read_lora_metadata(path: str | Path) -> dict:
    """What an adapter file records: ``{"base_model", "unet": {"rank", "alpha", "targets"}, ...}``.

    Only the parts the file holds are present. ``path`` is the folder or the ``.safetensors`` file.
    """
    with safetensors.safe_open(_weights_file(path), framework="pt") as f:
        header = f.metadata() or {}
    configs = json.loads(header.get(LORA_ADAPTER_METADATA_KEY, "{}"))
    info = {"base_model": json.loads(header.get(SDLITE_METADATA_KEY, "{}")).get("base_model")}
    for part in ("unet", "text_encoder"):
        if f"{part}.r" in configs:
            info[part] = {
                "rank": configs[f"{part}.r"],
                "alpha": configs[f"{part}.lora_alpha"],
                "targets": configs[f"{part}.target_modules"],
            }
    return info


def load_lora_into(
    unet,
    text_encoder,
    path: str | Path,
    adapter_name: str = "default",
    trainable: bool = False,
) -> None:
    """Load an adapter file into the models, as ``load_lora_weights`` would into a pipeline.

    To evaluate an adapter outside a pipeline (everything frozen), or to start training from it: with
    ``trainable`` the loaded adapter's matrices require grad while the bases stay frozen. (An interrupted run
    resumes from its checkpoint folder, which holds the optimizer too, not from this file.)
    ``text_encoder`` may be None when the file has no text-encoder adapter.
    """
    loader = StableDiffusionLoraLoaderMixin
    state, alphas, metadata = loader.lora_state_dict(
        str(_weights_file(path)), local_files_only=True, return_lora_metadata=True
    )
    has_te = any(k.startswith("text_encoder.") for k in state)
    if has_te and text_encoder is None:
        raise ValueError(f"{path} holds a text-encoder adapter; pass the text encoder to load it into")
    loader.load_lora_into_unet(state, alphas, unet, adapter_name=adapter_name, metadata=metadata)
    if has_te:
        loader.load_lora_into_text_encoder(
            state, alphas, text_encoder, adapter_name=adapter_name, metadata=metadata
        )
    for model in (unet, text_encoder):
        if model is not None:
            model.requires_grad_(False)
            for p in adapter_parameters(model, adapter_name):
                p.requires_grad_(trainable)
