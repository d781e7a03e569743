"""Checkpoints that survive anything, and stopping on a signal, for any training loop.

A checkpoint holds the trained weights (safetensors), the optimizer state (``torch.load`` with
``weights_only=True``: nothing is unpickled as code), the learning-rate schedule, the EMA and every
process's RNG state, so that ``--resume latest`` continues a run exactly. ``StopSignals`` turns
SIGTERM / SIGINT into a checkpoint at the next step boundary and a clean exit.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, load_model, save_file, save_model

from sdlite.models import unpickling_refusal

if TYPE_CHECKING:
    from sdlite.training.loop import EMA

CHECKPOINT = re.compile(r"^checkpoint-(\d+)(|\.tmp|\.old)$")
MARKER = "COMPLETE"  # written last: a checkpoint folder without it is not one


# ---- checkpoints ------------------------------------------------------------------------------------
#
# A checkpoint is written to checkpoint-N.tmp, every file fsynced, marked COMPLETE, then renamed to
# checkpoint-N; an existing checkpoint-N is first renamed to checkpoint-N.old. A process killed at any
# moment (SIGKILL, power loss) so leaves at most one half-written .tmp folder, which has no marker and
# is never read. Killed between the two renames, it leaves checkpoint-N.old (and a complete .tmp) but
# no checkpoint-N: ``checkpoints`` then takes the complete .tmp, else the .old, in its place.


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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Delete a published folder, its marker first: a kill midway leaves an incomplete folder, never a
    "complete" one with files missing."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Mark ``tmp`` complete, then rename it to ``final`` (replacing an old one): never half-written."""
    for file in tmp.rglob("*"):  # on disk before the marker says so, in case the power goes
        if file.is_file():
            _fsync(file)
    with open(tmp / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    old = final.with_name(final.name + ".old")
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)  # the renames themselves
    if old.exists():
        remove_dir(old)


def _agree(accelerator: Accelerator, ok: bool) -> bool:
    """True when every process is ``ok``; a barrier too, so a failure on one process stops all of them
    instead of leaving the others waiting for it."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor(float(ok), device=accelerator.device)
    return bool(accelerator.reduce(flag, "min").item())


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizer,
    lr_schedule,
    ema: EMA | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically (all processes call it); keep the newest ``keep``.

    An OSError while writing (a full disk) removes the partial folder and raises CheckpointError on
    every process; the earlier checkpoints stay as they were.
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    error = None
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            tmp.mkdir(parents=True)
    except OSError as e:
        error = e
    if _agree(accelerator, error is None):
        try:
            _write_checkpoint(accelerator, tmp, step, modules, optimizer, lr_schedule, ema)
        except OSError as e:
            error = e
    if _agree(accelerator, error is None) and accelerator.is_main_process:
        try:
            publish_dir(tmp, final)
            for old in checkpoints(output_dir)[: -keep if keep else 0]:
                remove_dir(old)
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


def _write_checkpoint(accelerator, tmp: Path, step: int, modules, optimizer, lr_schedule, ema) -> None:
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, tmp / f"rng-{accelerator.process_index}.safetensors")
    if not accelerator.is_main_process:
        return
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
    if ema is not None:
        save_file(ema.state_dict(), tmp / "ema.safetensors")
    (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")


def load_tensors_pickle(path: Path):
    """A torch.save file of tensors, numbers and containers only: weights_only unpickling, which refuses
    every other class or function, so a tampered file cannot run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = unpickling_refusal(e)[:200] or "not a plain tensor file"
        raise CheckpointError(
            f"{str(path)!r} holds pickled objects other than tensors ({reason}); refused, because "
            "unpickling them could run code. Only load checkpoints you or sdlite wrote."
        ) from None


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    modules: dict[str, torch.nn.Module],
    optimizer,
    lr_schedule,
    ema: EMA | None = None,
) -> dict:
    """Restore what ``save_checkpoint`` wrote (every process calls it); returns state.json."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    for name, module in modules.items():
        load_model(
            accelerator.unwrap_model(module),
            str(path / f"{name}.safetensors"),
            device=str(accelerator.device),
        )
    optimizer.load_state_dict(load_tensors_pickle(path / "optimizer.pt"))
    lr_schedule.load_state_dict(state["lr_schedule"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    if ema is not None:
        ema.load_state_dict(
            load_file(path / "ema.safetensors", device=str(accelerator.device)), state["ema_updates"]
        )
    rng_file = path / f"rng-{accelerator.process_index}.safetensors"
    if rng_file.is_file():  # absent when resuming with more processes than the run had
        rng = load_file(rng_file)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients were NaN or inf and the run was told to stop (nonfinite_loss=stop)."""


# ---- stopping on a signal ------------------------------------------------------------------------------


class StopSignals:
    """SIGTERM and SIGINT (Ctrl-C) ask a run to stop at a step boundary, after a checkpoint.

    The handler only records the signal: the loop asks ``requested`` after each step and, when it says
    so, saves and exits with status 128 + the signal number (143 for SIGTERM, 130 for SIGINT), the
    status of a process the signal ended. Under ``accelerate launch`` every process gets the signal
    (the launcher forwards it, a terminal sends Ctrl-C to all), but not necessarily between the same
    two steps; so with several processes the flag is shared by an all-reduce at the loop's host-sync
    points (``synced``: log and checkpoint steps) and all stop at the same step. The launcher kills
    processes that outlive its grace period (30 s for torchrun): that is safe, the checkpoints are
    crash-proof, but keep log_every steps shorter than it. A second signal is only reported (the
    launcher may forward the terminal's Ctrl-C again); Ctrl-\\ (SIGQUIT) or SIGKILL stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number, frame) -> None:
        first = self.received is None
        self.received = self.received or number
        what = "stopping after this step, with a checkpoint" if first else "already stopping"
        # os.write, not print: the handler may interrupt a print (tqdm's), and print is not reentrant.
        os.write(2, f"\n{signal.Signals(number).name}: {what} (Ctrl-\\ or SIGKILL stops at once)\n".encode())

    def requested(self, accelerator: Accelerator, synced: bool) -> int | None:
        """The signal to stop for, the same on every process; None to go on."""
        if accelerator.num_processes == 1:
            return self.received
        if not synced:
            return None
        flag = torch.tensor(float(self.received or 0), device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item()) or None
