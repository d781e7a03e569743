"""The LoRA section of the U-Net trainer's config: adapters (LoRA, LoHa, LoKr, DoRA) on a frozen model,
what they target, how they are saved, and the frozen base's storage.

Imports neither torch nor peft (see training/config/__init__.py).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from training.checks import numbers_outside
from training.config.sections import Section, option

# sdlite.lora's UNET_TARGETS and TEXT_ENCODER_TARGETS, written out so as not to import torch and peft
# here (tests/test_train.py keeps them equal): the attention projections LoRA adapts by default.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
# How the frozen base weights of a LoRA run may be stored (training/stored_weights.py).
BASE_DTYPES = ("bf16", "fp8")


@dataclass
class LoraSection(Section):
    title = "LoRA"
    about = (
        "train low-rank adapters on the frozen model instead of its weights (learning_rate is the U-Net "
        "adapter's). The update is (lora_alpha / lora_rank) B A; alpha None means alpha = rank."
    )

    lora: bool = option(False, "train LoRA adapters (Hu et al. 2021) instead of the weights")
    lora_rank: int = option(4, "r, the adapters' rank")
    lora_alpha: float | None = option(None, "α; the update is scaled by α / r; None: α = r")
    lora_dropout: float = option(0.0, "dropout on the adapters' input")
    lora_target_modules: list[str] = option(list(UNET_TARGETS), "U-Net attention")
    lora_text_encoder: bool = option(
        False, "an adapter on the text encoder too (embeddings are then not cached)"
    )
    lora_text_encoder_target_modules: list[str] = option(
        list(TEXT_ENCODER_TARGETS), "the text encoder's attention projections"
    )
    text_encoder_lr: float | None = option(
        None, "the text encoder adapter's learning rate; None: learning_rate"
    )
    lora_from_scratch: bool = option(
        False, "with lora and no pretrained: adapt a preset's random weights (tests)"
    )
    lora_save_format: str = option(
        "diffusers",
        '"kohya": also final_dir/lora_kohya.safetensors (A1111, ComfyUI); the diffusers layout is '
        "always written (LoHa, LoKr: lora_kohya.safetensors alone, which diffusers does not read)",
    )
    lora_type: str = option(
        "lora",
        '"lora"; "loha" (Hadamard product of two rank-r pairs) or "lokr" (Kronecker product): LyCORIS\'s, '
        "saved in its layout",
    )
    lora_dora: bool = option(
        False, "DoRA (Liu et al. 2024): lora_type lora plus a trained magnitude per output row"
    )
    # Memory (docs/training.md: Fitting a card).
    lora_base_dtype: str | None = option(
        None,
        'the frozen U-Net\'s weights stored in "bf16" or "fp8" (float8_e4m3fn, as kohya\'s --fp8_base), '
        "each layer upcast as it runs; None: mixed_precision's dtype (fp32 without it)",
    )

    def problems(self) -> list[str]:
        problems = []
        if self.lora and (self.lora_rank < 1 or not 0 <= self.lora_dropout < 1):
            problems.append(
                f"lora_rank {self.lora_rank} must be >= 1, lora_dropout {self.lora_dropout} in [0, 1)"
            )
        if self.lora_save_format not in ("diffusers", "kohya"):
            problems.append(f"lora_save_format={self.lora_save_format!r}: use diffusers or kohya")
        problems += self.lora_type_problems()
        if self.lora_base_dtype not in (None, *BASE_DTYPES):
            problems.append(f"lora_base_dtype={self.lora_base_dtype!r}: use bf16, fp8 or none")
        return problems + numbers_outside(self, "lora_alpha", "text_encoder_lr", above=True)

    def lora_type_problems(self) -> list[str]:
        """An unknown lora_type, and the LoRA-only settings given to a LoHa or LoKr."""
        if self.lora_type not in ("lora", "loha", "lokr"):
            return [f"lora_type={self.lora_type!r}: use lora, loha or lokr"]
        if self.lora_type == "lora":
            return []
        problems = []
        if self.lora_dora:  # peft trains DoRA's magnitude on LoRA layers only
            problems.append(f"lora_dora with lora_type {self.lora_type}: DoRA is trained on lora_type lora")
        if self.lora_dropout:  # LoRA's dropout is on its input; peft's LoHa and LoKr have none
            problems.append(f"lora_dropout with lora_type {self.lora_type}: it is LoRA's; set it to 0")
        return problems


# The settings that shape an adapter: one changed without lora true is a contradiction.
LORA_KEYS = tuple(f.name for f in fields(LoraSection) if f.name != "lora")
