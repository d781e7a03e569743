"""What a pipeline adds on top of its base weights: LoRA adapters and IP-Adapter image prompts.

- LoRA (``sdlite.lora``, or any file in diffusers' layout) loads through diffusers'
  ``StableDiffusionLoraLoaderMixin``; ``ExactLoraFuse`` makes ``unfuse_lora`` restore each weight bit
  for bit instead of subtracting the update again (which rounds), and lets ``set_adapters`` weigh
  adapters on a U-Net whose ``layers_per_block`` is a list (one count per level).
- IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter") loads through
  diffusers' ``IPAdapterMixin`` (``load_ip_adapter``, ``set_ip_adapter_scale``); ``ImagePrompts``
  turns ``ip_adapter_image`` (through the CLIP image encoder) or ``ip_adapter_image_embeds`` into the
  per-image embeddings the U-Net's IP-Adapter attention reads, with the unconditional half first.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models import ImageProjection
from diffusers.models.embeddings import MultiIPAdapterImageProjection
from diffusers.utils.peft_utils import set_weights_and_activate_adapters
from peft.tuners.tuners_utils import BaseTunerLayer

from sdlite.kohya import kohya_lora_state


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
        converted = kohya_lora_state(pretrained_model_name_or_path_or_dict)
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
