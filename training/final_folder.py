"""What a U-Net run leaves in final_dir (training/train.py's ``save_final`` writes it into the staging
folder that ``Trainer.publishing`` renames into place): one of three kinds of result, and the run's
config beside it as train_config.yaml.

- LoRA: the adapters alone, pytorch_lora_weights.safetensors (what ``load_lora_weights`` reads), and
  lora_kohya.safetensors with ``lora_save_format: kohya``.
- Textual inversion: the word's vectors, in diffusers' and A1111's files.
- Otherwise a diffusers folder (sdlite.models, models_xl) with the EMA weights in unet/ and
  text_encoder/ when the run kept an EMA, and the weights the loss trained in unet_raw/ (and
  text_encoder_raw/) beside them; under FSDP from the whole weights gathered onto the main process.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from training.config.keys import save_yaml
from training.sharding import unsharded_models
from training.textual_inversion import save_word


def write_final(trainer, folder: Path, raw: dict | None = None, averaged: dict | None = None) -> None:
    """The result of ``trainer`` (training.train.UNetTrainer) into ``folder``, on the main process; under
    FSDP ``raw`` and ``averaged`` are the gathered state dicts (the trained weights and their EMA)."""
    cfg, parts = trainer.cfg, trainer.parts
    if cfg.adapters.lora:
        base = cfg.model.pretrained or f"sdlite preset {cfg.model.preset}"
        trainer.family.save_lora(folder, cfg.adapters, base_model=base)
    elif cfg.inverts:
        save_word(folder, cfg.inversion.textual_inversion_token, trainer.words)
    elif trainer.sharding:
        if trainer.ema is not None:
            for name, model in unsharded_models(trainer.model, raw).items():
                model.save_pretrained(folder / f"{name}_raw")
        dataclasses.replace(parts, **unsharded_models(trainer.model, averaged)).save_pretrained(folder)
    else:
        if trainer.ema is not None:
            parts.unet.save_pretrained(folder / "unet_raw")
            if cfg.model.train_text_encoder:
                for name, text_encoder in trainer.family.encoders.items():
                    text_encoder.save_pretrained(folder / f"{name}_raw")
        with trainer.ema_weights():
            parts.save_pretrained(folder)
    save_yaml(cfg, folder / "train_config.yaml")
