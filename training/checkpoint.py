"""Checkpoints that survive anything, for any training loop (stopping on a signal: training/signals.py).

A checkpoint holds the trained weights (safetensors), the optimizer state (``torch.load`` with
``weights_only=True``: nothing is unpickled as code), the learning-rate schedule, the EMA and every
process's RNG state, so that ``--resume latest`` continues a run exactly, and the run's config (a
sharded run's weights, optimizer state and EMA: every process's shards, with torch.distributed.checkpoint,
training/sharding.py). A
failed write is a CheckpointError naming the last complete checkpoint; an unreadable file on loading
is a CorruptCheckpointError naming it (training.resume then tries an older checkpoint).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from sdlite.durable import fsync
from sdlite.models import unpickling_refusal
from training.sharding import is_sharded, is_sharded_checkpoint, load_sharded, local, save_sharded

if TYPE_CHECKING:
    from training.optim import EMA

CHECKPOINT = re.compile(r"^checkpoint-(\d+)(|\.tmp|\.old)$")
MARKER = "COMPLETE"  # written last, with each file's sha256: a checkpoint folder without it is not one
OWNED = ".sdlite-checkpoint"  # written first into checkpoint-N.tmp: the folder is ours to remove
# The files a checkpoint holds. A folder of a checkpoint's name holding only these (a kill may have left
# any subset, the mark included) is a leftover of ours; one holding anything else is not ours to delete.
OUR_FILES = re.compile(
    r"^(COMPLETE|\.sdlite-checkpoint|state\.json|config\.json|optimizer\.pt|ema\.safetensors|"
    r"rng-\d+\.safetensors|(unet|text_encoder|text_encoder_2|vae)(_lora)?\.safetensors|"
    r"\.metadata|__\d+_\d+\.distcp)$"  # a sharded run's (DCP): every process's shards, their index
)


# ---- checkpoints ------------------------------------------------------------------------------------
#
# A checkpoint is written to checkpoint-N.tmp, every file fsynced, marked COMPLETE, then renamed to
# checkpoint-N; an existing checkpoint-N is first renamed to checkpoint-N.old. A process killed at any
# moment (SIGKILL, power loss) so leaves at most one half-written .tmp folder, which has no marker and
# is never read. Killed between the two renames, it leaves checkpoint-N.old (and a complete .tmp) but
# no checkpoint-N: ``checkpoints`` then takes the complete .tmp, else the .old, in its place. The
# marker records each file's sha256, checked before the file is read on resume: bytes damaged after
# the write (a disk, a copy) are found even where the safetensors header is intact.


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (disk full: the earlier ones stay intact) or read safely."""


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (one folder per step; see above for .tmp/.old)."""
    best: dict[int, tuple[int, Path]] = {}
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT.match(path.name)
        if match and (path / MARKER).is_file():
            step, rank = int(match[1]), ("", ".tmp", ".old").index(match[2])
            if step not in best or rank < best[step][0]:
                best[step] = (rank, path)
    return [best[step][1] for step in sorted(best)]


def find_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``"latest"`` (None if the run has none yet) or a folder."""
    if not resume:
        return None
    if resume == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a complete checkpoint (it has no {MARKER} file)")
    return path


def fsync_tree(folder: Path) -> None:
    """Every file under ``folder`` on disk (not only in the page cache)."""
    for file in folder.rglob("*"):
        if file.is_file():
            fsync(file)


def remove_dir(path: Path) -> None:
    """Delete a folder of ours, its marker first and its ownership mark last: a kill midway leaves an
    incomplete folder that is still recognisably ours, never a "complete" one with files missing."""
    (path / MARKER).unlink(missing_ok=True)
    for entry in path.iterdir() if path.is_dir() else ():
        if entry.name != OWNED:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def is_ours(path: Path) -> bool:
    """Whether sdlite wrote this folder of a checkpoint's name: it holds one of our marks, or only files
    of the names a checkpoint has (what a kill leaves of one; an empty folder too)."""
    if not path.is_dir():
        return False
    if (path / OWNED).is_file() or (path / MARKER).is_file():
        return True
    return all(entry.is_file() and OUR_FILES.match(entry.name) for entry in path.iterdir())


def foreign_folders(output_dir: str | Path) -> list[Path]:
    """The entries of output_dir named like our checkpoints that sdlite did not write (another trainer's
    checkpoint-500/, a user's checkpoint-3.tmp/notes.txt): never deleted, and the run refuses them."""
    found = Path(output_dir).glob("checkpoint-*") if Path(output_dir).is_dir() else ()
    return sorted(p for p in found if CHECKPOINT.match(p.name) and not is_ours(p))


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def recorded_checksums(folder: Path) -> dict[str, str] | None:
    """The sha256 of each file, as the marker recorded them; None for a checkpoint of an sdlite before
    checksums (its marker says only "ok")."""
    try:
        sums = json.loads((folder / MARKER).read_text())["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return sums if isinstance(sums, dict) else None


def publish_dir(tmp: Path, final: Path) -> None:
    """Mark ``tmp`` complete, with each file's sha256, then rename it to ``final`` (replacing an old one):
    never half-written."""
    fsync_tree(tmp)  # on disk before the marker says so, in case the power goes
    sums = {p.name: sha256_of(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != OWNED}
    with open(tmp / MARKER, "w") as f:
        f.write(json.dumps({"sha256": sums}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync(final.parent)  # the renames themselves
    if old.exists():
        remove_dir(old)


# What a write raises when the disk is full or the folder read-only: OSError from Python's own writes,
# SafetensorError from safetensors' writer, RuntimeError from torch.save's zip writer (most of the bytes).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _agree(accelerator: Accelerator, ok: bool) -> bool:
    """True when every process is ``ok``; a barrier too, so a failure on one process stops all of them
    instead of leaving the others waiting for it."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(float(ok), device=accelerator.device)
    return bool(accelerator.reduce(flag, "min").item())


def remove_leftovers(output_dir: str | Path, before: int | None = None) -> list[Path]:
    """Remove the checkpoint folders a killed process left half-written or half-deleted (no marker) and
    marked .tmp/.old copies that a checkpoint of their step supersedes; only those of steps < ``before``
    (None: all, safe only while the run holds output_dir's lock, as then no other process writes one).
    Only folders of ours (``is_ours``): whatever else carries a checkpoint's name is left alone."""
    by_step, removed = {}, []
    for path in Path(output_dir).glob("checkpoint-*"):
        match = CHECKPOINT.match(path.name)
        if not (match and is_ours(path)) or (before is not None and int(match[1]) >= before):
            continue
        if (path / MARKER).is_file():
            by_step.setdefault(int(match[1]), []).append(path)
        else:
            remove_dir(path)
            removed.append(path)
    for paths in by_step.values():  # keep the one ``checkpoints`` takes: "" before .tmp before .old
        paths.sort(key=lambda p: ("", ".tmp", ".old").index(CHECKPOINT.match(p.name)[2]))
        for extra in paths[1:]:
            remove_dir(extra)
            removed.append(extra)
    return sorted(removed)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer,
    lr_schedule,
    ema: EMA | None = None,
    keep: int | None = None,
    config: dict | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (all processes call it); keep the newest ``keep``.

    ``config``, the run's config as a dict, is saved as config.json: a resume compares the new config
    with it (training.resume). Any write failure (a full disk: OSError, SafetensorError, torch's
    RuntimeError) removes the partial folder and raises CheckpointError on every process, naming the
    last complete checkpoint, which stays as it was. Rotation also removes older folders a killed
    process left incomplete.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    error = None
    try:
        if accelerator.is_main_process:
            if is_ours(tmp):  # left by a crash (a folder not ours there makes mkdir fail: nothing deleted)
                remove_dir(tmp)
            tmp.mkdir(parents=True)
            (tmp / OWNED).write_text("sdlite writes a checkpoint here, then renames it\n")
    except OSError as e:
        error = e
    if _agree(accelerator, error is None):
        try:
            _write_checkpoint(accelerator, tmp, step, modules, optimizer, lr_schedule, ema, config)
        except WRITE_ERRORS as e:
            error = e
    if _agree(accelerator, error is None) and accelerator.is_main_process:
        try:
            publish_dir(tmp, final)
            for old in checkpoints(output_dir)[: -keep if keep else 0]:
                remove_dir(old)
            remove_leftovers(output_dir, before=step)
        except OSError as e:
            error = e
    if not _agree(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space the partial copy took
        previous = [p for p in checkpoints(output_dir) if p != final]
        kept = f"the last complete one, {previous[-1]}, is intact" if previous else "there is no earlier one"
        cause = f"{type(error).__name__}: {error}" if error else "it failed on another process"
        raise CheckpointError(
            f"could not write checkpoint {str(final)!r} ({cause}); {kept}. Free disk space (or fix the "
            "folder's permissions), then continue with --resume latest"
        ) from error
    return final


def sharded_root(modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """A sharded run's one module (training/sharding.py: its weights, optimizer state and EMA are saved
    by every process, with DCP), else None."""
    found = [module for module in modules.values() if is_sharded(module)]
    return found[0] if found else None


def _write_checkpoint(accelerator, tmp: Path, step, modules, optimizer, lr_schedule, ema, config) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / f"rng-{accelerator.process_index}.safetensors")
    sharded = sharded_root(modules)
    if sharded is not None:
        save_sharded(tmp, sharded, optimizer, ema)
    if not accelerator.is_main_process:
        return
    if sharded is None:
        for name, module in modules.items():
            save_model(accelerator.unwrap_model(module), str(tmp / f"{name}.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {
        "step": step,
        "lr_schedule": lr_schedule.state_dict(),
        "ema_updates": ema.updates if ema else 0,
    }
    if accelerator.scaler is not None:
        state["scaler"] = accelerator.scaler.state_dict()
    if ema is not None and sharded is None:
        save_file(ema.state_dict(), tmp / "ema.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")


# ---- reading ---------------------------------------------------------------------------------------------


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is missing, truncated or unreadable (``--resume latest`` tries an older one)."""


def load_tensors_pickle(path: Path):
    """A torch.save file of tensors, numbers and containers only: weights_only unpickling, which refuses
    every other class or function, so a tampered file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not any(word in str(e) for word in ("GLOBAL", "global", "allowlisted")):  # no code refused:
            raise CorruptCheckpointError(f"{str(path)!r} is corrupt ({str(e)[:200]})") from None  # bad bytes
        reason = unpickling_refusal(e)[:200] or "not a plain tensor file"
        raise CheckpointError(
            f"{str(path)!r} holds pickled objects other than tensors ({reason}); refused, because "
            "unpickling them could run code. Only load checkpoints you or sdlite wrote."
        ) from None


def read_file(path: Path, reader: Callable, sums: dict[str, str] | None = None):
    """``reader(path)``, with any failure to read it, or bytes that differ from the sha256 in ``sums``
    (the marker's), as a CorruptCheckpointError naming the file."""
    if not path.is_file():
        raise CorruptCheckpointError(f"{str(path)!r} is missing: the checkpoint is incomplete")
    if sums and path.name in sums and sha256_of(path) != sums[path.name]:
        raise CorruptCheckpointError(
            f"{str(path)!r} is corrupt: its bytes no longer match the sha256 recorded when it was written"
        )
    try:
        return reader(path)
    except CheckpointError:
        raise
    except (OSError, SafetensorError, RuntimeError, ValueError, KeyError, EOFError) as e:
        raise CorruptCheckpointError(
            f"{str(path)!r} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})"
        ) from None


def check_shapes(module: torch.nn.Module, path: Path) -> None:
    """CheckpointError, before loading, if the file's tensors do not fit ``module`` (another preset or
    model, another LoRA rank): named with the tensor and both shapes, not torch's size-mismatch dump."""

    def header(file):
        with safe_open(file, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}

    saved, wanted = read_file(path, header), {k: tuple(v.shape) for k, v in module.state_dict().items()}
    wrong = [k for k in wanted.keys() & saved.keys() if saved[k] != wanted[k]]
    missing = sorted(wanted.keys() - saved.keys())
    if wrong or missing:
        if wrong:
            what = f"{wrong[0]} is {saved[wrong[0]]} there but {wanted[wrong[0]]} in this run's model"
        else:
            what = f"it lacks {len(missing)} of the model's tensors, e.g. {missing[0]}"
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not fit this run's model: {what}. It was written by a run "
            "with another preset, pretrained model or LoRA setting; resume with that config, or start a "
            "new output_dir"
        )


def nonfinite_count(tensors) -> int:
    """How many values of these tensors are NaN or inf (one host sync)."""
    counts = [(~torch.isfinite(t)).sum() for t in tensors if t.is_floating_point()]
    return int(torch.stack(counts).sum()) if counts else 0


def check_finite(state: dict[str, torch.Tensor], file: Path) -> None:
    """CorruptCheckpointError if loaded weights hold NaN or inf: garbage bytes under an intact header (a
    checkpoint without checksums), or weights a run diverged to; a run never saves them on purpose."""
    bad = nonfinite_count(state.values())
    if bad:
        raise CorruptCheckpointError(f"{str(file)!r} holds {bad:,} NaN or inf weights")


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer,
    lr_schedule,
    ema: EMA | None = None,
) -> dict:
    """Restore what ``save_checkpoint`` wrote (every process calls it); returns state.json. A missing or
    unreadable file: CorruptCheckpointError naming it; a model that does not fit: CheckpointError."""
    path = Path(path)
    device, sums = str(accelerator.device), recorded_checksums(path)
    state = read_file(path / "state.json", lambda p: json.loads(p.read_text()), sums)
    sharded = sharded_root(modules)
    if (sharded is not None) != is_sharded_checkpoint(path):
        written, this = ("an unsharded", "under FSDP") if sharded else ("a sharded (FSDP)", "without FSDP")
        raise CheckpointError(
            f"{str(path)!r} was written by {written} run and this run trains {this}: resume it as it was "
            "launched (docs/scale-out.md), or start a new output_dir"
        )
    if sharded is not None:
        load_sharded_checkpoint(path, sharded, optimizer, ema, sums)
    for name, module in modules.items() if sharded is None else ():
        file, model = path / f"{name}.safetensors", accelerator.unwrap_model(module)
        check_shapes(model, file)
        read_file(file, lambda p, m=model: load_model(m, str(p), device=device), sums)
        check_finite(model.state_dict(), file)
    if sharded is None:
        optimizer.load_state_dict(read_file(path / "optimizer.pt", load_tensors_pickle, sums))
    lr_schedule.load_state_dict(state["lr_schedule"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None and sharded is not None:
        ema.updates = state["ema_updates"]
    elif ema is not None:
        shadow = read_file(path / "ema.safetensors", lambda p: load_file(p, device=device), sums)
        check_finite(shadow, path / "ema.safetensors")
        ema.load_state_dict(shadow, state["ema_updates"])
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.is_file():  # absent when resuming with more processes than the run had
        rng = read_file(rng_file, load_file, sums)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer, ema: EMA | None, sums) -> None:
    """A sharded checkpoint into a sharded run: every DCP file checked against its sha256 first, a DCP
    failure reported as a corrupt checkpoint, and this process's shards checked for NaN and inf."""
    files = [path / ".metadata", *sorted(path.glob("__*_*.distcp"))]
    for file in files:
        read_file(file, lambda p: None, sums)
    try:
        load_sharded(path, model, optimizer, ema)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as e:
        raise CorruptCheckpointError(
            f"{str(path)!r}: its sharded files do not load ({type(e).__name__}: {str(e)[:200]})"
        ) from None
    shards = {k: local(v) for k, v in model.state_dict().items()}
    check_finite(shards, path / ".metadata")
    if ema is not None:
        check_finite({k: local(v) for k, v in ema.state_dict().items()}, path / ".metadata")


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients were NaN or inf and the run was told to stop (nonfinite_loss=stop)."""
