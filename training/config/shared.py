"""The sections both trainers share (data, optimisation, run), and other tools' flags named as ours.

``DataBase``, ``OptimizerBase`` and ``RunBase`` are extended by the U-Net trainer's sections
(training/config/unet.py) and the VAE trainer's (training/config/vae.py), which may give a key another
default by redeclaring it. The ``*_FLAGS`` tables map the flags of diffusers' and kohya's training
scripts to ours, or say why sdlite has none: a config's ``FOREIGN_FLAGS``.
"""

from __future__ import annotations

import dataclasses

from training.checks import SEEDS, counts_below, numbers_outside
from training.config.sections import Section, option

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
