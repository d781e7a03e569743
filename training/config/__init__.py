"""The trainers' configs: one typed config per entry point, in sections, from YAML and the command line.

    from training.config import TrainConfig, parse_config

    cfg = parse_config(TrainConfig, ["--config", "configs/tiny-shapes.yaml", "--max_steps", "200"])
    cfg.optimizer.max_steps  # 200: each key lives in one section; users write the keys flat

A file per part:

- sections.py: ``Section`` (some keys that check themselves), ``Config`` (sections), ``option``;
- shared.py: the data, optimisation and run sections both trainers extend, other tools' flag names;
- unet.py: ``TrainConfig``, the U-Net trainer's config (training/train.py), with its model, data,
  captions, optimizer and run sections; its larger sections have a file each: lora.py, dreambooth.py,
  validation.py, inversion.py (textual inversion), distill.py (latent consistency distillation) and
  inpaint.py (an inpainting U-Net);
- vae.py: ``VAETrainConfig``, the VAE trainer's (training/train_vae.py);
- keys.py: the flat keys: read from YAML and flags (``parse_config``, ``from_dict``), written back
  (``to_dict``, ``save_yaml``), and ``--help``.

Reading a config file (UTF-8 YAML of at most 1 MiB, without Python tags or aliases) and converting each
value to its key's type are training/checks.py's. No file here imports torch or a model library, so that
a command line parses and prints ``--help`` in a fraction of a second.
"""

from training.checks import ConfigError, load_yaml
from training.config.keys import field_docs, from_dict, get, keys, parse_config, save_yaml, to_dict
from training.config.sections import Config, Section, option, section
from training.config.unet import TrainConfig
from training.config.vae import VAETrainConfig

__all__ = [
    "Config",
    "ConfigError",
    "Section",
    "TrainConfig",
    "VAETrainConfig",
    "field_docs",
    "from_dict",
    "get",
    "keys",
    "load_yaml",
    "option",
    "parse_config",
    "save_yaml",
    "section",
    "to_dict",
]
