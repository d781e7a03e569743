"""What a pipeline adds on top of its base weights: LoRA adapters and IP-Adapter image prompts.

- LoRA (``sdlite.lora``, or any file in diffusers' layout) loads through diffusers'
  ``StableDiffusionLoraLoaderMixin``; ``ExactLoraFuse`` makes ``unfuse_lora`` restore each weight bit
  for bit instead of subtracting the update again (which rounds), and lets ``set_adapters`` weigh
  adapters on a U-Net whose ``layers_per_block`` is a list (one count per level).
- Textual inversion (``sdlite.textual_inversion``): ``Embeddings.load_textual_inversion`` reads
  diffusers', A1111's and SDXL's (``clip_l`` / ``clip_g``) embedding files, checks them against the
  pipeline's encoders, then adds the word through diffusers' ``TextualInversionLoaderMixin``, into
  both encoders for SDXL. Prompts and negative prompts name it; a word of n vectors is spelt out to
  n tokens by ``maybe_convert_prompt`` where the pipeline tokenizes.
- IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter") loads through
  diffusers' ``IPAdapterMixin`` (``load_ip_adapter``, ``set_ip_adapter_scale``); ``ImagePrompts``
  turns ``ip_adapter_image`` (through the CLIP image encoder) or ``ip_adapter_image_embeds`` into the
  per-image embeddings the U-Net's IP-Adapter attention reads, with the unconditional half first.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.models import ImageProjection
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from peft.tuners.tuners_utils import BaseTunerLayer

from pipelines.lora_check import layer_named as _layer
from sdlite import kohya
from sdlite.lycoris import is_lycoris, read_lycoris
from sdlite.textual_inversion import SDXL_KEYS, EmbeddingFileError, read_embedding


class ExactLoraFuse:
    """``lora_state_dict`` / ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights`` over diffusers'
    LoRA loader mixin."""

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict, **kwargs):
        """diffusers' reading of a LoRA, safetensors only (a pickled ``.bin`` could run code), except
        a kohya-layout file (A1111, ComfyUI): ``sdlite.kohya`` keeps each module's alpha, where
        diffusers' own conversion gives every module of a part the commonest one."""
        kwargs.setdefault("use_safetensors", True)
        _refuse_pickled_lora(pretrained_model_name_or_path_or_dict)
        converted = kohya_lora_state(pretrained_model_name_or_path_or_dict, kwargs.get("unet_config"))
        if converted is None:
            return super().lora_state_dict(pretrained_model_name_or_path_or_dict, **kwargs)
        state, metadata = converted
        return (state, None, metadata) if kwargs.get("return_lora_metadata") else (state, None)

    def fuse_lora(self, components=("unet", "text_encoder"), lora_scale: float = 1.0, **kwargs):
        """diffusers' ``fuse_lora`` (W += lora_scale * (alpha / r) B A in place: calls then skip the LoRA
        branch), keeping a copy of each weight it changes so that ``unfuse_lora`` restores it bit for
        bit. peft unfuses by subtracting the update, (W + ΔW) - ΔW, which rounds. The copies cost the
        memory of the adapted layers' weights until unfused."""
        originals = self.__dict__.setdefault("_weights_before_fuse", {})
        for layer in self._lora_layers(components):
            originals.setdefault(layer, layer.get_base_layer().weight.detach().clone())  # the first fuse's
        super().fuse_lora(components=list(components), lora_scale=lora_scale, **kwargs)

    def unfuse_lora(self, components=("unet", "text_encoder"), **kwargs):
        super().unfuse_lora(components=list(components), **kwargs)
        originals = self.__dict__.get("_weights_before_fuse", {})
        for layer in self._lora_layers(components):
            if layer in originals and not layer.merged:
                layer.get_base_layer().weight.data.copy_(originals.pop(layer))

    def set_adapters(self, adapter_names, adapter_weights=None):
        """diffusers' ``set_adapters``, also on a U-Net with one ``layers_per_block`` count per level.

        diffusers' U-Net reads every weight through ``_maybe_expand_lora_scales``, which takes
        ``layers_per_block`` for one number (it adds 1 for the up blocks) even when the weight is a
        plain number that needs no expansion, and fails on a list. Here such a U-Net gets its numbers
        set as they are; per-block weights (a dict) would need the per-level counts that helper lacks,
        so they are refused before anything changes."""
        unet = getattr(self, "unet", None)
        if unet is None or isinstance(unet.config.layers_per_block, int):
            return super().set_adapters(adapter_names, adapter_weights)
        _refuse_block_weights(adapter_weights, unet.config.layers_per_block)
        unet.set_adapters = lambda names, weights=None: _set_unet_weights(unet, names, weights)
        try:
            super().set_adapters(adapter_names, adapter_weights)
        finally:
            del unet.set_adapters  # the instance attribute: the class's method is back

    def unload_lora_weights(self, *args, **kwargs):
        super().unload_lora_weights(*args, **kwargs)
        self.__dict__.pop("_weights_before_fuse", None)  # a fused update stays in: nothing to undo
        for layer, weight in self.__dict__.pop("_weights_before_lycoris", {}).items():
            layer.weight.data.copy_(weight)  # LyCORIS updates were merged: the weights they replaced

    def load_lycoris(self, source, adapter_name=None, strength: float = 1.0, **kwargs) -> None:
        """A LyCORIS file (LoHa, LoKr, DoRA; ``sdlite.lycoris``) merged into the weights at ``strength``:
        exact for every kind, as A1111 and ComfyUI apply them; ``unload_lora_weights`` restores the
        weights bit for bit. Every module is checked first: nothing changes unless all fit."""
        modules = read_lycoris(source, self.unet.config)
        updates = []
        for (part, module), m in modules.items():
            model = getattr(self, part, None)
            layer = _layer(model, module) if model is not None else None
            if layer is None or getattr(layer, "weight", None) is None:
                raise ValueError(
                    f"this LyCORIS file adapts {part}.{module}, which this {self._lora_family} pipeline "
                    "lacks: a file for another model; nothing was loaded"
                )
            widths = (layer.weight[0].numel(), layer.weight.shape[0])  # in·kh·kw for a convolution
            if m.widths() != widths:
                raise ValueError(
                    f"{part}.{module}: the LyCORIS update is {m.widths()[0]} -> {m.widths()[1]} wide where "
                    f"this layer is {widths[0]} -> {widths[1]}; nothing was loaded"
                )
            updates.append((layer, m))
        originals = self.__dict__.setdefault("_weights_before_lycoris", {})
        with torch.no_grad():
            for layer, m in updates:
                originals.setdefault(layer, layer.weight.detach().clone())
                layer.weight.data.copy_(m.apply(layer.weight, strength))

    def _lora_layers(self, components) -> list[BaseTunerLayer]:
        models = [model for model in (getattr(self, name, None) for name in components) if model is not None]
        return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


def _refuse_block_weights(adapter_weights, layers_per_block) -> None:
    weights = adapter_weights if isinstance(adapter_weights, list) else [adapter_weights]
    for weight in weights:
        unet_weight = weight.get("unet") if isinstance(weight, dict) else weight
        if isinstance(unet_weight, dict):
            raise ValueError(
                f"per-block LoRA weights ({unet_weight}) need one layers_per_block for every level, and this "
                f"U-Net has {list(layers_per_block)}: give one number per adapter (or per component, "
                "{'unet': 0.8, 'text_encoder': 1.0})"
            )


def _set_unet_weights(unet, names, weights) -> None:
    """What the U-Net's own ``set_adapters`` does with plain numbers, without its block expansion."""
    names = [names] if isinstance(names, str) else list(names)
    weights = weights if isinstance(weights, list) else [weights] * len(names)
    set_weights_and_activate_adapters(unet, names, [1.0 if w is None else w for w in weights])


def kohya_lora_state(source, unet_config=None) -> tuple[dict, dict] | None:
    """A kohya-layout LoRA (a ``.safetensors`` path or a state dict) as what diffusers'
    ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` take: (the state dict in diffusers'
    layout, the metadata giving each module its alpha). None for anything else, left to diffusers.

    For a pipeline's ``lora_state_dict``: diffusers' own reading of a kohya file gives every module of
    a part one alpha, the commonest (its ``alpha_pattern`` keys name no module of peft's), so a file
    whose modules differ in alpha (a resized or extracted LoRA) would load some at the wrong strength.
    ``unet_config`` is the pipeline's U-Net's, where an SDXL file's SGM-named modules go.
    """
    if isinstance(source, dict):
        tensors = source
    elif isinstance(source, (str, Path)) and Path(source).is_file() and Path(source).suffix == ".safetensors":
        kohya.refuse_pickle(Path(source))
        try:
            with safetensors.safe_open(source, framework="pt") as f:
                keys = list(f.keys())  # the names only: a diffusers-layout file is not read twice
        except Exception:  # not a safetensors file: diffusers' reading says what it is
            return None
        tensors = kohya.load_lora_file(source)[0] if keys and all(map(kohya.is_kohya_key, keys)) else {}
    else:
        return None
    if not tensors or not all(map(kohya.is_kohya_key, tensors)):
        return None
    try:
        modules = kohya.modules_from_kohya(tensors, unet_config)
    except kohya.LoraFileError:  # LyCORIS, another model's LoRA...: diffusers' reading names the problem
        return None
    state, header = kohya.to_diffusers(modules)
    return state, json.loads(header[kohya.ADAPTER_METADATA_KEY])


def is_lycoris_source(source) -> bool:
    """Whether a LoRA source (a state dict or a ``.safetensors`` file) is a LyCORIS one."""
    if isinstance(source, dict):
        return is_lycoris(source)
    file = kohya.weights_file(source) if isinstance(source, (str, Path)) else None
    if file is None or not file.is_file() or file.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(file, framework="pt") as f:
            return is_lycoris(f.keys())
    except Exception:  # not a safetensors file: the LoRA reading names what it is
        return False


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _refuse_pickled_lora(source) -> None:
    if not isinstance(source, (str, Path)) or not Path(source).exists():
        return  # a state dict, or a name diffusers' reading resolves and names
    path = Path(source)
    files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.bin")]
    if files and all(f.suffix in PICKLE_SUFFIXES for f in files):
        raise ValueError(
            f"LoRA {str(source)!r} is a pickle ({', '.join(f.name for f in files)}): refused, because "
            "loading one can run code; save or convert it as .safetensors"
        )


class Embeddings(TextualInversionLoaderMixin):
    """``load_textual_inversion`` for sdlite's pipelines, SD's and SDXL's."""

    def load_textual_inversion(self, pretrained_model_name_or_path, token: str | None = None, **kwargs):
        """Add the word of an embedding file (or state dict) to the text encoder(s): SD's one, or SDXL's
        two from the file's ``clip_l`` and ``clip_g``. ``token`` overrides the word the file names (or its
        file name, for A1111's files). Checked first: nothing changes unless every part fits."""
        if kwargs.get("tokenizer") is not None or kwargs.get("text_encoder") is not None:
            # one encoder named by the caller, as diffusers' SDXL recipe does: diffusers' own reading
            return super().load_textual_inversion(pretrained_model_name_or_path, token=token, **kwargs)
        embedding = read_embedding(pretrained_model_name_or_path, token)
        pairs = self._embedding_targets(embedding)
        for key, (tokenizer, encoder) in pairs.items():
            width = encoder.get_input_embeddings().weight.shape[1]
            if embedding.vectors[key].shape[1] != width:
                raise EmbeddingFileError(
                    f"the embedding {embedding.token!r} has {embedding.vectors[key].shape[1]}-wide vectors "
                    f"{f'for {key} ' if key else ''}where this text encoder reads {width}: an embedding "
                    "for another model"
                )
            if embedding.token in tokenizer.get_vocab():
                raise EmbeddingFileError(
                    f"{embedding.token!r} is a word the tokenizer knows already: pass another token=..."
                )
        for key, (tokenizer, encoder) in pairs.items():
            vectors = {embedding.token: embedding.vectors[key].to(encoder.dtype)}
            super().load_textual_inversion(vectors, tokenizer=tokenizer, text_encoder=encoder)

    def _embedding_targets(self, embedding) -> dict:
        """{the embedding's key: (tokenizer, text encoder)} in this pipeline, or a clear refusal."""
        sdxl = getattr(self, "text_encoder_2", None) is not None
        if embedding.family == "SDXL" and not sdxl:
            raise EmbeddingFileError(
                f"{embedding.token!r} is an SDXL embedding (clip_l and clip_g): load it into an SDXL pipeline"
            )
        if embedding.family != "SDXL" and sdxl:
            raise EmbeddingFileError(
                f"{embedding.token!r} has one set of vectors (an SD 1.x/2.x embedding); SDXL's take a "
                "clip_l and a clip_g set. To use it with one SDXL encoder, pass tokenizer= and text_encoder="
            )
        if not sdxl:
            return {"": (self.tokenizer, self.text_encoder)}
        clip_l, clip_g = SDXL_KEYS
        return {clip_l: (self.tokenizer, self.text_encoder), clip_g: (self.tokenizer_2, self.text_encoder_2)}


class ImagePrompts:
    """IP-Adapter inputs -> the U-Net's ``added_cond_kwargs["image_embeds"]``."""

    @property
    def num_ip_adapters(self) -> int:
        """How many IP-Adapters ``load_ip_adapter`` has put into the U-Net (0 when none)."""
        projection = getattr(self.unet, "encoder_hid_proj", None) if self.unet is not None else None
        if isinstance(projection, MultiIPAdapterImageProjection):
            return len(projection.image_projection_layers)
        return 0

    @torch.no_grad()
    def encode_image(self, image, device, num_images_per_prompt: int = 1, output_hidden_states=None):
        """(embeds, unconditional embeds) of an image prompt, each repeated per image.

        The pooled, projected CLIP embedding (B, D) for a plain IP-Adapter; with ``output_hidden_states``
        (IP-Adapter Plus) the penultimate layer's tokens (B, T, D), whose unconditional side is a black
        image's, where the pooled one's is zeros.
        """
        dtype = next(self.image_encoder.parameters()).dtype
        if not isinstance(image, torch.Tensor):
            image = self.feature_extractor(image, return_tensors="pt").pixel_values
        image = image.to(device=device, dtype=dtype)
        if output_hidden_states:
            cond = self.image_encoder(image, output_hidden_states=True).hidden_states[-2]
            uncond = self.image_encoder(torch.zeros_like(image), output_hidden_states=True).hidden_states[-2]
        else:
            cond = self.image_encoder(image).image_embeds
            uncond = torch.zeros_like(cond)
        n = num_images_per_prompt
        return cond.repeat_interleave(n, dim=0), uncond.repeat_interleave(n, dim=0)

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image,
        ip_adapter_image_embeds,
        device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:
        """One tensor per IP-Adapter: (n, ...) image embeddings, or (2n, ...) [unconditional; conditional]
        under guidance. Given embeddings hold [unconditional; conditional] under guidance, as diffusers'."""
        pairs = []  # (unconditional or None, conditional), one per adapter
        if ip_adapter_image_embeds is None:
            images = ip_adapter_image if isinstance(ip_adapter_image, list) else [ip_adapter_image]
            layers = self.unet.encoder_hid_proj.image_projection_layers
            for image, layer in zip(images, layers):
                cond, uncond = self.encode_image(image, device, 1, not isinstance(layer, ImageProjection))
                pairs.append((uncond[None], cond[None]))  # a leading axis: one image prompt per adapter
        else:
            for embeds in ip_adapter_image_embeds:
                pairs.append(embeds.chunk(2) if do_classifier_free_guidance else (None, embeds))
        out = []
        for uncond, cond in pairs:
            cond = torch.cat([cond] * num_images_per_prompt)
            if do_classifier_free_guidance:
                cond = torch.cat([torch.cat([uncond] * num_images_per_prompt), cond])
            out.append(cond.to(device))
        return out
