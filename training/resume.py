"""Resuming a run: which config changes a resume may make, and the checkpoint that still loads.

    base_lrs = list(lr_schedule.base_lrs)  # the new config's rates, before the checkpoint overwrites them
    found = resume(acc, cfg.run.output_dir, cfg.run.resume, modules, optimizer, lr_schedule, ema,
                   config=to_dict(cfg), allow=cfg.run.allow_config_change, base_lrs=base_lrs, log=acc.print)
    start_step = found.state["step"] if found else 0

A resume continues the run the checkpoint belongs to, so its config must be that run's, except for
what does not change what is trained (RESUMABLE: how long, how often to log, save and validate, where
the files go, speed switches). Every other key (data, batch, seed, model, resolution, LoRA, optimizer,
loss) is refused unless named in ``allow_config_change``; an allowed learning rate really reaches the
optimizer (the checkpoint's optimizer and schedule would otherwise keep the old one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from training.checkpoint import (
    CorruptCheckpointError,
    _agree,
    checkpoints,
    find_resume,
    load_checkpoint,
    read_file,
    recorded_checksums,
)

# May change on resume: they set how long the run goes, what it reports and where, and how fast it runs;
# the weights after step N do not depend on them (max_steps does move a decaying schedule's end).
RESUMABLE = frozenset({
    "max_steps", "log_every", "checkpoint_every", "checkpoints_total_limit", "report_to",
    "validation_prompts", "validation_prompts_file", "validation_every", "validation_inference_steps",
    "validation_guidance", "validation_image", "validation_strength",
    "val_data_dir", "val_count", "val_timesteps", "eval_every", "scale_count",
    "output_dir", "final_dir", "resume", "allow_config_change", "cache_dir", "cache_latents", "cache_text",
    "dataloader_num_workers", "compile", "allow_tf32", "gradient_checkpointing", "channels_last",
    "bad_data", "nonfinite_loss", "lora_save_format", "collective_timeout",
})  # fmt: skip
# Refused unless allowed; when allowed, set in the loaded optimizer and schedule (set_learning_rates).
LEARNING_RATES = ("learning_rate", "text_encoder_lr")
PATH_KEYS = frozenset({"train_data_dir", "pretrained", "vae_path", "eval_data_dir"})
# Every other key, and any key this table does not know, is refused unless allowed: the data and its
# order (train_data_dir, streaming, train_batch_size, gradient_accumulation_steps, seed, resolution,
# random_crop/flip, caption_dropout), the model (preset, pretrained, vae_path, train_text_encoder,
# prediction_type, lora*), the optimizer (lr_scheduler, lr_warmup_steps, adam_*, use_8bit_adam,
# max_grad_norm, ema_decay), the loss (snr_gamma, noise_offset, kl_weight) and mixed_precision.


class ResumeConfigError(ValueError):
    """A resume whose config changes what the checkpoint's run trained, without allow_config_change."""


@dataclass
class ConfigChanges:
    """Keys whose value differs between the checkpoint's config and the new one: key -> (old, new)."""

    allowed: dict[str, tuple] = field(default_factory=dict)
    refused: dict[str, tuple] = field(default_factory=dict)


def _plain(value):
    return json.loads(json.dumps(value, default=str))  # tuples -> lists, Paths -> str


def _same(key: str, old, new) -> bool:
    if old == new:
        return True
    both_paths = key in PATH_KEYS and isinstance(old, str) and isinstance(new, str)
    return both_paths and os.path.realpath(old) == os.path.realpath(new)


def compare_configs(saved: dict, new: dict, allow: Iterable[str] = ()) -> ConfigChanges:
    """Split the keys that changed into allowed (RESUMABLE or named in ``allow``) and refused. Keys the
    saved config lacks (an older sdlite) are not compared."""
    allow, changes = set(allow), ConfigChanges()
    for key, value in _plain(new).items():
        if key not in saved or _same(key, old := _plain(saved[key]), value):
            continue
        (changes.allowed if key in RESUMABLE or key in allow else changes.refused)[key] = (old, value)
    return changes


def saved_config(checkpoint: Path) -> dict | None:
    """The config a checkpoint was trained with: its config.json, else (checkpoints of sdlite before
    config.json) the run folder's config.yaml; None if neither exists."""
    if (checkpoint / "config.json").is_file():
        return read_file(checkpoint / "config.json", lambda p: json.loads(p.read_text()))
    run_config = checkpoint.parent / "config.yaml"
    return yaml.safe_load(run_config.read_text()) if run_config.is_file() else None


def check_resume_config(saved: dict | None, new: dict, allow: Iterable[str], checkpoint: Path) -> list[str]:
    """ResumeConfigError naming every refused change and the fix; else the log lines of the allowed ones."""
    if saved is None:
        return [f"{checkpoint} has no saved config: the new config is taken as it is"]
    changes = compare_configs(saved, new, allow)
    if changes.refused:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.refused.items())
        raise ResumeConfigError(
            f"resuming from {checkpoint} with a config that changes what that run trained: {listed}. "
            "Resume with the run's values, start a new output_dir, or, to change them on purpose, pass "
            f"--allow_config_change {','.join(changes.refused)}"
        )
    return [f"resume changes {k}: {old!r} -> {new!r}" for k, (old, new) in changes.allowed.items()]


def set_learning_rates(optimizer, lr_schedule, base_lrs: list[float]) -> None:
    """Give a loaded optimizer and schedule new base learning rates (one per param group), so that this
    step and every later one use them; the schedule's position (warm-up, decay) stays where it was."""
    lambdas = getattr(lr_schedule, "lr_lambdas", None)  # diffusers' schedules are LambdaLRs
    for i, (group, old, new) in enumerate(zip(optimizer.param_groups, lr_schedule.base_lrs, base_lrs)):
        if lambdas is not None:
            group["lr"] = new * lambdas[i](lr_schedule.last_epoch)
        else:
            group["lr"] = group["lr"] * new / old if old else new
        group["initial_lr"] = new
    lr_schedule.base_lrs = list(base_lrs)
    lr_schedule._last_lr = [group["lr"] for group in optimizer.param_groups]


@dataclass
class Resumed:
    checkpoint: Path
    state: dict  # state.json: step, ...
    changes: list[str]  # the log lines of the config changes it allowed


def resume(
    accelerator,
    output_dir: str | Path,
    resume_from: str | None,
    modules: dict,
    optimizer,
    lr_schedule,
    ema=None,
    *,
    config: dict,
    allow: Iterable[str] = (),
    base_lrs: list[float] | None = None,
    log: Callable[[str], None] = print,
) -> Resumed | None:
    """Load the checkpoint ``resume_from`` names ("latest" or a folder; None: none) after checking the
    config against the checkpoint's; with "latest", a checkpoint with a corrupt file (unreadable, not
    matching its recorded sha256, or of NaN or inf weights) is passed over for the newest one that loads
    (and the log says so); a named checkpoint that is corrupt is an error.
    ``base_lrs``: the new config's learning rates, applied when a learning rate change is allowed."""
    if not resume_from:
        return None
    if resume_from == "latest":
        candidates = list(reversed(checkpoints(output_dir)))
        if not candidates:
            return None
    else:
        candidates = [find_resume(output_dir, resume_from)]
    for index, checkpoint in enumerate(candidates):
        error, older = None, candidates[index + 1] if index + 1 < len(candidates) else None
        try:
            saved = saved_config(checkpoint)
            lines = check_resume_config(saved, config, allow, checkpoint)
            state = load_checkpoint(accelerator, checkpoint, modules, optimizer, lr_schedule, ema)
        except CorruptCheckpointError as e:
            error = e
        if not _agree(accelerator, error is None):  # every process passes over the same checkpoint
            what = error or "a file of it is corrupt on another process"
            if resume_from != "latest":
                raise CorruptCheckpointError(f"cannot resume from {checkpoint}: {what}") from error
            if older is None:
                raise CorruptCheckpointError(
                    f"no checkpoint in {output_dir} loads; the oldest, {checkpoint}: {what}. Start a new "
                    "output_dir, or run without --resume"
                ) from error
            log(f"warning: {checkpoint} does not load ({what}); resuming from the one before, "
                f"{older.name}, instead")  # fmt: skip
            continue
        changed = compare_configs(saved, config, allow).allowed if saved is not None else {}
        if base_lrs is not None and any(key in LEARNING_RATES for key in changed):
            set_learning_rates(optimizer, lr_schedule, base_lrs)
        if recorded_checksums(checkpoint) is None:
            lines.append(f"{checkpoint.name} has no checksums (an earlier sdlite wrote it): its files were "
                         "checked for being readable and finite only")  # fmt: skip
        for line in lines:
            log(line)
        return Resumed(checkpoint, state, lines)
    return None
