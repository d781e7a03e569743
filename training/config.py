"""One typed config per entry point, in sections: loaded from YAML, overridable from the command line.

    cfg = parse_config(TrainConfig, ["--config", "configs/tiny-shapes.yaml", "--max_steps", "200"])
    cfg.optimizer.max_steps  # 200: each key lives in one section (training/config_sections.py)

A config is a dataclass whose fields are its sections, each a dataclass of keys (``Section``) that
checks itself (``problems``). Users write the keys flat, in a YAML file or as ``--key value`` flags:
every key belongs to exactly one section, so ``max_steps: 200`` needs no section name. The sections
hold the only copy of the defaults; the YAML file and then the command line override them, in that
order. A key's type comes from its annotation, so a misspelt key or a value of the wrong type fails at
start-up naming it; its ``--help`` text is the field's ``metadata["help"]`` (``option``), and its
section's ``title`` and ``about`` head its group in ``--help``. A config file is UTF-8 YAML of at most
1 MiB, read without Python tags (as ``yaml.safe_load``) and without aliases, so that a few hundred bytes
cannot stand for billions of values. diffusers' and kohya's flags are read as ours first
(training/foreign_flags.py); a config's ``FOREIGN_FLAGS`` ({other tool's name: ours or why there is
none}) turn another tool's key in a YAML file into an error that names ours.
A plain dataclass of keys (no sections) loads the same way.

Here too: the sections both trainers share (``DataBase``, ``OptimizerBase``, ``RunBase``) and the VAE
trainer's config, which is those sections with some other defaults and a few keys of its own; the
U-Net trainer's config, with its own sections, is training/config_sections.py. Reading a config file
and converting each value to its key's type are training/checks.py's.

This module imports neither torch nor any model library, so that a command line parses and prints
``--help`` in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from sdlite.presets import PRESETS, Preset
from training.checks import SEEDS, ConfigError, convert, counts_below, load_yaml, numbers_outside
from training.errors import DEBUG_ENV, DEBUG_FLAG

C = TypeVar("C")


def option(default: Any, help: str) -> Any:
    """A key of a section: its default and its ``--help`` text (a list default is copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=functools.partial(list, default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class Section:
    """A part of a config: some keys and what is wrong with them. A subclass may give a key of its base
    another default by redeclaring it without help text; the base's help is then shown."""

    title: ClassVar[str] = ""  # its group's title in --help
    about: ClassVar[str] = ""  # a line under the title

    def problems(self) -> list[str]:
        """What is wrong with this section's settings, in words; empty when they are fine."""
        return []


@dataclasses.dataclass
class Config:
    """A trainer's config: its fields are its sections. ``problems`` gathers every section's and the
    checks that read several sections (``cross_problems``); ``check`` raises them all at once."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = {}

    def sections(self) -> list[Section]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def cross_problems(self) -> list[str]:
        """What is wrong with settings of several sections together."""
        return []

    def problems(self) -> list[str]:
        problems = [problem for part in self.sections() for problem in part.problems()]
        return problems + self.cross_problems()

    def check(self) -> None:
        """ConfigError listing every problem, one a line, before anything is built or read."""
        problems = self.problems()
        if problems:
            raise ConfigError("\n".join(f"bad training config: {problem}" for problem in problems))


def section(kind: type[Section]):
    """A config's field holding a section, built with the section's defaults."""
    return dataclasses.field(default_factory=kind)


# diffusers' flag -> ours ("--name ..."), or why sdlite has none.
DIFFUSERS_FLAGS = {
    "max_train_steps": "--max_steps",
    "num_train_epochs": "--max_steps (sdlite counts optimizer steps, not epochs)",
    "checkpointing_steps": "--checkpoint_every",
    "resume_from_checkpoint": "--resume (latest or a checkpoint folder)",
    "dataset_name": "--train_data_dir (a local folder or file: sdlite downloads nothing)",
    "logging_dir": "logs always go to output_dir/logs",
    "scale_lr": "set --learning_rate to the rate you want",
    "push_to_hub": "sdlite uploads nothing; upload final_dir with huggingface_hub if you wish",
    "enable_xformers_memory_efficient_attention": "attention already runs torch's fused SDPA kernels",
}


# kohya's sd-scripts' names for what sdlite has (reported as sd-scripts' names).
SD_SCRIPTS_FLAGS = {
    "sample_prompts": "sd-scripts: --validation_prompts_file",
    "sample_every_n_steps": "sd-scripts: --validation_every",
}
UNET_FLAGS = {
    "pretrained_model_name_or_path": "--pretrained (a local diffusers-layout folder)",
    "rank": "--lora_rank (with --lora true)",
    "validation_prompt": "--validation_prompts (each flag value one prompt)",
    "validation_epochs": "--validation_every (in optimizer steps)",
    "use_ema": "--ema_decay (a decay such as 0.9999; none turns the EMA off)",
    "center_crop": "--random_crop false (the centre crop is the default)",
}


# ---- the sections every trainer takes -------------------------------------------------------------------


@dataclasses.dataclass
class DataBase(Section):
    title = "Data"
    about = "an image folder with metadata.jsonl, a save_to_disk folder, or a CSV/parquet/JSON-lines file"

    train_data_dir: str = option("data/shapes/train", "the training data")
    image_column: str = option("image", "the column of images (files, paths or bytes)")
    resolution: int | None = option(None, "the image side in pixels; None: the model's sample_size")
    allow_outside_paths: bool = option(False, "image paths in a table may point outside the table's folder")
    max_image_pixels: int | None = option(
        None, "most pixels an image may declare; None: 64 x resolution², >= 4096²"
    )

    def problems(self) -> list[str]:
        problems = counts_below(self, 1, "resolution")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            problems.append(f"max_image_pixels={self.max_image_pixels} must be >= 1 (or none: the default)")
        return problems


@dataclasses.dataclass
class OptimizerBase(Section):
    title = "Optimisation"
    about = "steps are optimizer steps"

    seed: int = option(
        0, "every random draw of the run follows from it (the initial weights, the data order, noise)"
    )
    max_steps: int = option(1000, "optimizer steps to train for, in all")
    train_batch_size: int = option(32, "images per process per micro-step")
    learning_rate: float = option(1e-4, "AdamW's peak rate")
    lr_scheduler: str = option("constant", "any diffusers.optimization schedule, in optimizer steps")
    lr_warmup_steps: int = option(0, "steps of linear warm-up from 0")
    adam_weight_decay: float = option(1e-2, "AdamW's decoupled weight decay")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0: no clipping")
    mixed_precision: str | None = option(None, '"no", "fp16", "bf16"; None: accelerate\'s config decides')

    def problems(self) -> list[str]:
        problems = []
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            problems.append(f"mixed_precision={self.mixed_precision!r}: use no, fp16 or bf16")
        problems += counts_below(self, 1, "max_steps", "train_batch_size")
        problems += counts_below(self, 0, "lr_warmup_steps")
        if self.seed not in SEEDS:
            problems.append(f"seed={self.seed}: use a whole number from 0 to {SEEDS[-1]} (default 0)")
        problems += numbers_outside(self, "learning_rate", above=True)
        problems += numbers_outside(self, "adam_weight_decay", "max_grad_norm")
        return problems + self.lr_scheduler_problems()

    def lr_scheduler_problems(self) -> list[str]:
        from diffusers.optimization import SchedulerType  # here: this module imports no torch

        names = [kind.value for kind in SchedulerType]
        return (
            [] if self.lr_scheduler in names else [f"lr_scheduler={self.lr_scheduler!r}: use one of {names}"]
        )


@dataclasses.dataclass
class RunBase(Section):
    title = "Run and checkpoints"
    about = "the run's folder, logging, checkpoints, faults (README: Reliability)"

    output_dir: str = option("runs/train", "the run's folder: config.yaml, checkpoints, logs/")
    log_every: int = option(50, "steps between logged means (also when the loop syncs with the device)")
    report_to: str | None = option("tensorboard", 'an accelerate tracker: "tensorboard", "wandb", ...; none')
    checkpoint_every: int = option(500, "steps between checkpoints (one at the end too); 0: none")
    checkpoints_total_limit: int | None = option(3, "keep the newest this many checkpoints; None: all")
    resume: str | None = option(
        None, '"latest" (output_dir\'s newest checkpoint, if any) or a checkpoint folder'
    )
    nonfinite_loss: str = option("skip", 'a NaN/inf loss or gradient: "skip" the step, or "stop" the run')
    collective_timeout: float = option(600.0, "seconds a process waits for the others (start-up: >= 30 min)")
    allow_config_change: list[str] = option([], "keys --resume may also change")

    def problems(self) -> list[str]:
        problems = counts_below(self, 1, "log_every")
        problems += counts_below(self, 1, "checkpoints_total_limit")  # 0 read as "keep all", -1 deleted
        problems += counts_below(self, 0, "checkpoint_every")
        problems += numbers_outside(self, "collective_timeout", above=True)  # seconds
        if self.nonfinite_loss not in ("skip", "stop"):
            problems.append(f"nonfinite_loss={self.nonfinite_loss!r}: use skip or stop")
        return problems


# ---- the VAE trainer --------------------------------------------------------------------------------------


@dataclasses.dataclass
class VAEModelSection(Section):
    title = "The model"

    preset: str = option("tiny", "the sdlite.presets VAE to build with random weights")
    vae_block_out_channels: list[int] | None = option(
        None, "the preset's VAE with these level widths (same f)"
    )
    vae_mid_block_attention: bool = option(True, "false: the middle blocks without their self-attention")

    def problems(self) -> list[str]:
        preset = PRESETS.get(self.preset)  # an unknown one is refused when built
        if preset is not None and self.vae_block_out_channels is not None:
            return preset.channels_problems("vae", self.vae_block_out_channels)
        return []

    def shaped_preset(self, preset: Preset) -> Preset:
        """The preset with this section's VAE shape keys applied: what train_vae.py builds."""
        if self.vae_block_out_channels is not None:
            preset = preset.with_vae_channels(self.vae_block_out_channels)
        if not self.vae_mid_block_attention:
            preset = preset.without_vae_mid_attention()
        return preset


@dataclasses.dataclass
class VAEDataSection(DataBase):
    eval_data_dir: str | None = option(None, "held-out images for PSNR; None: hold out eval_count of train")
    eval_count: int = option(256, "images held out of train_data_dir when eval_data_dir is None")

    def problems(self) -> list[str]:
        return super().problems() + counts_below(self, 1, "eval_count")


@dataclasses.dataclass
class VAEOptimizerSection(OptimizerBase):
    about = "a VAE at a constant rate can end on a loss spike; cosine decays to 0 at max_steps"

    max_steps: int = 600
    learning_rate: float = 2e-3
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 50
    adam_weight_decay: float = 0.0
    reconstruction_loss: str = option("mse", '"mse" or "l1"')
    kl_weight: float = option(1e-6, "the weight of KL(q(z|x) ‖ N(0, I)) against the reconstruction loss")

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.reconstruction_loss not in ("mse", "l1"):
            problems.append(f"reconstruction_loss={self.reconstruction_loss!r}: use mse or l1")
        return problems + numbers_outside(self, "kl_weight")


@dataclasses.dataclass
class VAERunSection(RunBase):
    output_dir: str = "runs/tiny-vae"
    log_every: int = 100
    checkpoint_every: int = 0
    checkpoints_total_limit: int | None = 2
    scale_count: int = option(1024, "training images encoded to measure the latents' std")
    eval_every: int = option(0, "steps between held-out PSNR reports; 0: only at the end")

    def problems(self) -> list[str]:
        return super().problems() + counts_below(self, 1, "scale_count") + counts_below(self, 0, "eval_every")


@dataclasses.dataclass
class VAETrainConfig(Config):
    """Train the preset's AutoencoderKL from scratch on an image folder."""

    FOREIGN_FLAGS: ClassVar[dict[str, str]] = DIFFUSERS_FLAGS | {
        "pretrained_model_name_or_path": "train_vae.py trains the --preset's VAE from random weights",
    }

    model: VAEModelSection = section(VAEModelSection)
    data: VAEDataSection = section(VAEDataSection)
    optimizer: VAEOptimizerSection = section(VAEOptimizerSection)
    run: VAERunSection = section(VAERunSection)


# ---- the keys of a config -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Key:
    name: str
    section: str | None  # the config's field that holds it; None in a plain dataclass of keys
    annotation: Any
    field: dataclasses.Field
    help: str
    group: type | None  # the section class, whose title and about head the key's --help group


def _help(cls: type, name: str) -> str:
    """A key's help text: its own field's, else the nearest base class's (a redeclared default)."""
    for klass in cls.__mro__:
        found = klass.__dict__.get("__dataclass_fields__", {}).get(name)
        if found is not None and found.metadata.get("help"):
            return found.metadata["help"]
    return ""


@functools.cache
def keys(cls: type) -> dict[str, Key]:
    """Every key of a config (section by section, in order) or of a plain dataclass, by name."""
    found: dict[str, Key] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if isinstance(kind, type) and issubclass(kind, Section):
            inner = typing.get_type_hints(kind)
            for g in dataclasses.fields(kind):
                if g.name in found:
                    raise TypeError(f"{cls.__name__}: key {g.name!r} is in two sections")
                found[g.name] = Key(g.name, f.name, inner[g.name], g, _help(kind, g.name), kind)
        else:
            found[f.name] = Key(f.name, None, kind, f, _help(cls, f.name), None)
    return found


def foreign_flag(cls: type, name: str) -> str | None:
    """The error for a flag or key ``name`` of another tool (cls.FOREIGN_FLAGS); None if it is not one."""
    hint = getattr(cls, "FOREIGN_FLAGS", {}).get(name)
    if hint is None or name in keys(cls):
        return None
    tool, ours = "diffusers'", hint
    if hint.startswith("sd-scripts: "):  # one of kohya's sd-scripts' flags
        tool, ours = "sd-scripts'", hint.removeprefix("sd-scripts: ")
    if ours.startswith("--"):
        return f"--{name} is {tool} name; sdlite's is {ours}"
    return f"--{name} is a flag of diffusers' training scripts that sdlite has no equivalent of: {hint}"


def from_dict(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Build ``cls`` from flat key: value pairs, each converted to its key's type; unknown keys fail."""
    known = keys(cls)
    for key in values:  # YAML reads `1:`, `on:` or `null:` as a number, a boolean or None
        if not isinstance(key, str):
            raise ConfigError(f"{source}: key {key!r} ({type(key).__name__}) is not a setting name: write "
                              "the setting's name, quoted if it reads as a number or true/false")  # fmt: skip
    unknown = sorted(set(values) - set(known))
    if unknown:
        foreign = [message for message in map(lambda k: foreign_flag(cls, k), unknown) if message]
        raise ConfigError(
            f"{source}: unknown key(s) {unknown} for {cls.__name__}"
            + "".join(f"; {message}" for message in foreign)
            + f"; known keys: {sorted(known)}"
        )
    flat, by_section = {}, {}
    for name, value in values.items():
        key = known[name]
        converted = convert(name, key.annotation, value)
        if key.section is None:
            flat[name] = converted
        else:
            by_section.setdefault(key.section, {})[name] = converted
    hints = typing.get_type_hints(cls)
    sections = {name: hints[name](**given) for name, given in by_section.items()}
    return cls(**flat, **sections)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config's keys, flat, in section order: what a YAML file or the flags would say."""
    values = dataclasses.asdict(cfg)
    return {
        name: values[key.section][name] if key.section else values[name]
        for name, key in keys(type(cfg)).items()
    }


def get(cfg: Any, name: str) -> Any:
    """The value of key ``name``, wherever its section is."""
    section = keys(type(cfg))[name].section
    return getattr(getattr(cfg, section) if section else cfg, name)


# ---- files and flags --------------------------------------------------------------------------------------


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """A ``--key`` flag per key, described by its help text and grouped by its section."""
    # allow_abbrev=False: a misspelt or shortened flag fails instead of setting some other key.
    parser = argparse.ArgumentParser(description=description or cls.__doc__, allow_abbrev=False,
                                     usage="%(prog)s [--config FILE] [--key value ...]")  # fmt: skip
    parser.add_argument("--config", help="YAML file of key: value pairs; flags override it")
    debug = f"show an error's traceback, not only its one-line message (or set {DEBUG_ENV}=1)"
    parser.add_argument(DEBUG_FLAG, action="store_true", help=debug)  # training/errors.py reads it
    groups = {}
    for key in keys(cls).values():
        if key.group not in groups:
            title, about = (key.group.title, key.group.about) if key.group else ("", "")
            groups[key.group] = parser.add_argument_group(title or None, about or None)
        help_text = f"{key.help} (default: {_default(key.field)})".strip().replace("%", "%%")  # %-formats
        # Values stay strings here and are converted once, with the YAML's, in from_dict.
        groups[key.group].add_argument(f"--{key.name}", default=argparse.SUPPRESS, help=help_text)
    return parser


def parse_config(cls: type[C], argv: list[str] | None = None) -> C:
    """Defaults of ``cls``, then the ``--config`` YAML file, then the ``--key value`` flags."""
    from training.foreign_flags import read_as_ours  # diffusers' and kohya's flags, every problem at once

    parser = build_parser(cls)
    try:
        argv = read_as_ours(cls, sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        parser.error(str(e))
    args = vars(parser.parse_args(argv))
    args.pop("debug")
    path = args.pop("config", None)
    values = load_yaml(path) if path else {}
    values.update(args)
    return from_dict(cls, values, source=path or "command line")


def save_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """{key: (its section's title, its help text)}: what ``--help`` says of each key."""
    return {name: (key.group.title if key.group else "", key.help) for name, key in keys(cls).items()}
