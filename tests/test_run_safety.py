"""The run folder as train.py uses it (issue 15, items 1-3): a final_dir of the user's files or equal to
output_dir is refused before training, a resume that changes what the run trained is refused unless
allowed (and an allowed learning rate reaches the optimizer), and a second run on one output_dir fails
naming the first. The tiny preset on 8 shapes images, batch 4, 2 steps.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sdlite.data.shapes import write_dataset
from training.resume import ResumeConfigError
from training.run_folder import FINAL_MARKER, RunFolderError, lock_run
from training.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=8, seed=0)


def flags(data, out: Path, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=out.parent / "cache", max_steps=2,
                  train_batch_size=4, learning_rate=1e-3, log_every=1, checkpoint_every=1, report_to="none",
                  ema_decay="none")  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def assert_unlocked(out: Path) -> None:
    """The run released output_dir: taking its lock finds no run of this process still holding it."""
    messages = []
    lock_run(out, log=messages.append).release()
    assert not any("did not release" in m for m in messages), messages


def test_a_final_dir_of_the_users_files_is_refused_before_training_and_kept(data, tmp_path):
    mine, out = tmp_path / "mine", tmp_path / "run"
    mine.mkdir()
    (mine / "photo.jpg").write_bytes(b"a photo")
    with pytest.raises(RunFolderError, match="photo.jpg"):
        main(flags(data, out, final_dir=mine))
    assert (mine / "photo.jpg").read_bytes() == b"a photo" and sorted(p.name for p in mine.iterdir()) == [
        "photo.jpg"
    ]
    assert not list(out.glob("checkpoint-*"))  # refused before step 0
    assert_unlocked(out)  # a failed start lets the next run in


def test_a_final_dir_equal_to_output_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RunFolderError, match="is output_dir"):
        main(flags(data, out, final_dir=out))
    assert not list(out.glob("checkpoint-*"))


def test_a_run_publishes_its_final_marked_and_a_resume_replaces_it(data, tmp_path):
    out = tmp_path / "run"
    main(flags(data, out))
    assert (out / "final" / FINAL_MARKER).is_file() and (out / "final" / "unet").is_dir()
    main(flags(data, out, resume="latest", max_steps=3))  # its own final: replaced, nothing left beside it
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == ["final"]
    assert '"step": 3' in (out / "final" / FINAL_MARKER).read_text()
    assert_unlocked(out)


def test_a_resume_with_another_batch_size_is_refused_and_an_allowed_learning_rate_is_used(
    data, tmp_path, capsys
):
    out = tmp_path / "run"
    main(flags(data, out))
    with pytest.raises(ResumeConfigError, match="train_batch_size: 4 -> 8"):
        main(flags(data, out, resume="latest", max_steps=3, train_batch_size=8))
    assert_unlocked(out)
    with pytest.raises(ResumeConfigError, match="allow_config_change learning_rate"):
        main(flags(data, out, resume="latest", max_steps=3, learning_rate=5e-4))
    main(
        flags(
            data, out, resume="latest", max_steps=3, learning_rate=5e-4, allow_config_change="learning_rate"
        )
    )
    assert "resume changes learning_rate: 0.001 -> 0.0005" in capsys.readouterr().out
    optimizer = torch.load(out / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [group["lr"] for group in optimizer["param_groups"]] == [pytest.approx(5e-4)]
    assert "learning_rate: 0.0005" in (out / "config.yaml").read_text()  # the config records the truth


def test_a_second_run_on_one_output_dir_fails_naming_the_first_ones_pid(data, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "training" / "train.py"), *flags(data, out, max_steps=100000,
                                                                     checkpoint_every=0, log_every=1000)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").exists():  # written once the first run holds the lock
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < deadline, "the first run did not start in 120 s"
            time.sleep(0.2)
        with pytest.raises(RunFolderError, match=f"in use by another training run \\(pid {first.pid} "):
            main(flags(data, out, learning_rate=5e-4))
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()
        first.communicate()


def test_sdlite_launch_hands_every_argument_after_it_to_the_launcher_unparsed(monkeypatch, capsys):
    from training import cli, launch

    received = []
    monkeypatch.setattr(launch, "main", lambda argv: received.append(argv) or 143)
    argv = ["--num_processes", "1", "--mixed_precision", "no", "training/train.py", "--max_steps", "3"]
    assert cli.main(["launch", *argv]) == 143  # the trainer's status is the command's
    assert received == [argv]
    with pytest.raises(SystemExit) as done:
        cli.main(["launch", "--help"])
    assert done.value.code == 0 and "on SIGTERM or Ctrl-C" in capsys.readouterr().out


def test_a_new_run_in_a_folder_holding_an_earlier_runs_checkpoints_is_refused_keeping_them(
    data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    main(flags(data, out))
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("checkpoint-*")}
    final = (out / "final" / FINAL_MARKER).read_bytes()
    monkeypatch.setattr("training.train.UNetTrainer.setup", lambda self: pytest.fail("the model was built"))
    with pytest.raises(
        RunFolderError, match=r"holds checkpoint-2 of an earlier run: .*--resume latest.*another"
    ):
        main(flags(data, out))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("checkpoint-*")} == before
    assert (out / "final" / FINAL_MARKER).read_bytes() == final  # that run's model stands
    assert_unlocked(out)


def test_a_resume_whose_max_steps_is_below_the_checkpoints_step_is_refused_before_the_model(
    data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    main(flags(data, out, max_steps=3))
    monkeypatch.setattr("training.train.UNetTrainer.setup", lambda self: pytest.fail("the model was built"))
    with pytest.raises(
        RunFolderError, match=r"checkpoint-3, which has trained 3 steps, past max_steps 2.*3 or more"
    ):
        main(flags(data, out, max_steps=2, resume="latest"))
    assert_unlocked(out)
