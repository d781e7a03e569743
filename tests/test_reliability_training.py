"""Training faults: NaN/inf steps, a full disk, SIGTERM, and SIGKILL at random moments.

Every run is the tiny preset on 16 shapes images, batch 4, 8 steps with a checkpoint after each; an
interrupted run resumed with --resume latest must end with the uninterrupted run's weights, bit for bit.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlite.data.shapes import write_dataset
from training import checkpoint
from training import train as train_module
from training.checkpoint import CheckpointError, NonFiniteLossError, checkpoints
from training.train import UNetTrainer, main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
KILL_STEPS = 30  # the kill test's run: long enough that four interruptions never reach its end


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=16, seed=0)


def flags(data, out, cache, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=cache, max_steps=STEPS,
                  train_batch_size=4, learning_rate=1e-3, log_every=2, checkpoint_every=1,
                  checkpoints_total_limit=2, ema_decay=0.9, random_flip="true", caption_dropout=0.25,
                  report_to="none", seed=0)  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def weights(out: Path, part: str) -> dict[str, torch.Tensor]:
    return load_file(next((out / "final" / part).glob("*.safetensors")))


def assert_same_weights(a: Path, b: Path) -> None:
    for part in ("unet_raw", "unet"):  # the trained weights and their EMA
        wa, wb = weights(a, part), weights(b, part)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), part


@pytest.fixture(scope="module")
def whole(data, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("whole")
    main(flags(data, out, out.parent / "cache"))
    return out


def nan_at(monkeypatch, calls: set[int]):
    """Make diffusion_loss NaN on the given calls (= steps: no accumulation, no validation loss)."""
    real, count = train_module.diffusion_loss, [0]

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        count[0] += 1
        return value * float("nan") if count[0] - 1 in calls else value

    monkeypatch.setattr(train_module, "diffusion_loss", loss)


def test_a_nan_step_is_skipped_without_touching_weights_or_optimizer(data, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, {3})
    main(flags(data, tmp_path, tmp_path / "cache", ema_decay="none", max_steps=5))
    assert "1 step(s) of step 4 had a NaN or inf loss" in capsys.readouterr().out
    final = weights(tmp_path, "unet")
    assert all(torch.isfinite(t).all() for t in final.values())
    # the fused AdamW kernel skipped the step on the device: 4 updates in 5 steps
    optimizer = torch.load(tmp_path / "checkpoint-5" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optimizer["state"].values()} == {4.0}


def test_nonfinite_loss_stop_stops_before_the_next_checkpoint(data, tmp_path, monkeypatch):
    nan_at(monkeypatch, {2})
    with pytest.raises(NonFiniteLossError, match=r"of step 3 had.*checkpoint-2"):
        main(flags(data, tmp_path, tmp_path / "cache", nonfinite_loss="stop"))
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    good = load_file(tmp_path / "checkpoint-2" / "unet.safetensors")
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (tmp_path / "final").exists()


def test_a_full_disk_while_saving_fails_clearly_and_keeps_the_last_checkpoint(
    data, tmp_path, monkeypatch, whole
):
    real, calls = checkpoint.save_model, [0]

    def fill_the_disk(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:  # checkpoint-4's U-Net, half-written
            Path(args[1]).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_model", fill_the_disk)
    with pytest.raises(CheckpointError, match=r"No space left on device.*checkpoint-3'?, is intact"):
        main(flags(data, tmp_path, tmp_path / "cache"))
    assert not (tmp_path / "checkpoint-4.tmp").exists()  # the partial copy's space is given back
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.undo()
    main(flags(data, tmp_path, tmp_path / "cache", resume="latest"))
    assert_same_weights(whole, tmp_path)


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_is_exact(data, tmp_path, monkeypatch, whole):
    real = UNetTrainer.optimizer_step

    def step(trainer, i):
        if i == 2:  # arrives mid-step; the loop checkpoints after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real(trainer, i)

    monkeypatch.setattr(UNetTrainer, "optimizer_step", step)
    with pytest.raises(SystemExit) as stopped:
        main(flags(data, tmp_path, tmp_path / "cache", checkpoint_every=0))
    assert stopped.value.code == 128 + signal.SIGTERM
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-3"] and not (tmp_path / "final").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    monkeypatch.undo()
    main(flags(data, tmp_path, tmp_path / "cache", resume="latest"))
    assert_same_weights(whole, tmp_path)


@pytest.fixture(scope="module")
def whole_long(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole_long")
    main(flags(data, out, out.parent / "cache", max_steps=KILL_STEPS))
    return out


def test_a_kill_between_the_renames_of_a_save_loses_nothing(data, tmp_path, whole):
    """A second save of one step (a finished run saving again) killed after checkpoint-N became .old."""
    main(flags(data, tmp_path, tmp_path / "cache", max_steps=4, checkpoint_every=2))
    final = tmp_path / "checkpoint-4"
    os.replace(final, final.with_name("checkpoint-4.old"))  # what publish_dir did before the kill
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4.old"]
    main(flags(data, tmp_path, tmp_path / "cache", resume="latest", checkpoint_every=2))
    assert_same_weights(whole, tmp_path)
    assert not (tmp_path / "checkpoint-4.old").exists()  # rotated away with the older ones


def launch(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, str(ROOT / "training" / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def newest_step(out: Path) -> int:
    found = checkpoints(out)
    return int(found[-1].name.split("-")[1].split(".")[0]) if found else 0


def wait_for_progress(process: subprocess.Popen, out: Path, past: int, deadline: float) -> None:
    while newest_step(out) <= past and process.poll() is None:
        assert time.monotonic() < deadline, "the training process made no progress"
        time.sleep(0.02)


def test_a_training_process_killed_at_random_moments_resumes_exactly(data, tmp_path, whole_long):
    """SIGTERM once (a clean stop), then SIGKILL three times at random moments of the steps and
    checkpoint writes after a checkpoint appears; each time --resume latest goes on."""
    rng, out, deadline = random.Random(0), tmp_path / "run", time.monotonic() + 150
    args = flags(data, out, whole_long.parent / "cache", resume="latest", max_steps=KILL_STEPS)
    process = launch(args)
    try:
        wait_for_progress(process, out, 1, deadline)
        process.send_signal(signal.SIGTERM)
        log = process.communicate(timeout=60)[0]
        assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
        assert "SIGTERM: stopped after step" in log
        for _ in range(3):
            assert newest_step(out) < KILL_STEPS, "the run finished before the third kill"
            process = launch(args)
            wait_for_progress(process, out, newest_step(out), deadline)
            time.sleep(rng.uniform(0, 0.4))  # a step takes ~0.1-0.2 s here, its checkpoint a fair part of it
            process.kill()
            process.communicate(timeout=60)
        process = launch(args)
        log = process.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        assert process.returncode == 0, log[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert_same_weights(whole_long, out)


def test_a_marked_tmp_folder_stands_in_for_a_checkpoint_its_save_did_not_rename(tmp_path):
    for name in ("checkpoint-1", "checkpoint-2.tmp", "checkpoint-3.tmp"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-1", "checkpoint-2.tmp"):  # 3.tmp: killed before its marker
        (tmp_path / name / "COMPLETE").write_text("ok\n")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2.tmp"]
    checkpoint.remove_dir(tmp_path / "checkpoint-2.tmp")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-1"]
