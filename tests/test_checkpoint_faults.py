"""Checkpoint writes that fail (a full disk, in each writer's own exception) and folders a kill left
behind."""

import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from training import checkpoint
from training.accelerator import setup_accelerator
from training.checkpoint import CheckpointError, checkpoints, save_checkpoint
from training.optim import EMA, make_lr_schedule, make_optimizer


@pytest.fixture
def run(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = make_optimizer(model.parameters(), lr=1e-2)
    schedule = make_lr_schedule(optimizer, "constant", 0, 10)
    return (
        setup_accelerator(tmp_path, report_to=None),
        model,
        optimizer,
        schedule,
        EMA(model.parameters(), 0.9),
    )


def save(run, out: Path, step: int, keep=None) -> Path:
    accelerator, model, optimizer, schedule, ema = run
    return save_checkpoint(accelerator, out, step, {"net": model}, optimizer, schedule, ema, keep)


def half_written(error):
    """A writer that leaves part of its file and raises ``error``, as when the disk fills up."""

    def write(*args, **kwargs):
        Path(args[1]).write_bytes(b"\0" * 1000)
        raise error

    return write


FULL = os.strerror(errno.ENOSPC)
FAILURES = {  # what each writer raises on a full disk
    "safetensors save_file (the EMA)": ("save_file", SafetensorError(f"Error while serializing: {FULL}")),
    "safetensors save_model (the U-Net)": ("save_model", SafetensorError(f"I/O error: {FULL}")),
    "torch.save (the optimizer)": ("torch_save", RuntimeError("[enforce fail at inline_container.cc] . "
                                                             "PytorchStreamWriter failed writing file")),
    "an OSError (ENOSPC)": ("save_model", OSError(errno.ENOSPC, FULL)),
}  # fmt: skip


@pytest.mark.parametrize("writer", FAILURES)
def test_every_kind_of_write_failure_is_a_checkpoint_error_that_names_the_last_checkpoint(
    run, tmp_path, monkeypatch, writer
):
    save(run, tmp_path, 1)
    name, error = FAILURES[writer]
    if name == "torch_save":
        monkeypatch.setattr(checkpoint.torch, "save", half_written(error))
    elif name == "save_file":
        real = checkpoint.save_file  # the rng file is written first: fail on the EMA's
        monkeypatch.setattr(checkpoint, "save_file", lambda t, f: (half_written(error) if "ema" in str(f)
                                                                   else real)(t, f))  # fmt: skip
    else:
        monkeypatch.setattr(checkpoint, name, half_written(error))
    with pytest.raises(
        CheckpointError, match=rf"checkpoint-2'? \({type(error).__name__}: .*checkpoint-1'?, is intact"
    ):
        save(run, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-1"]


def test_rotation_removes_older_folders_a_kill_left_incomplete(run, tmp_path):
    """A kill during rotation: checkpoint-1's marker gone, some files deleted; never read, now removed."""
    save(run, tmp_path, 1)
    (tmp_path / "checkpoint-1" / "COMPLETE").unlink()
    (tmp_path / "checkpoint-1" / "optimizer.pt").unlink()
    save(run, tmp_path, 2, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2"]
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]


def test_rotation_leaves_a_newer_folder_being_written(run, tmp_path):
    (tmp_path / "checkpoint-9.tmp").mkdir(parents=True)  # another save in flight (newest): not touched
    save(run, tmp_path, 2, keep=2)
    assert (tmp_path / "checkpoint-9.tmp").is_dir()
