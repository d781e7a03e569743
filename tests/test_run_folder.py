"""The run folder's lock and the final folder: one run per output_dir; nothing deleted that the run
did not write."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest

from training import run_folder
from training.checkpoint import MARKER
from training.run_folder import (
    FINAL_MARKER,
    RunFolderError,
    final_staging,
    lock_run,
    open_run_folder,
    prepare_final_dir,
    publish_final,
)


def rank(is_main_process):  # the two things open_run_folder asks of an Accelerator, on one process
    return SimpleNamespace(is_main_process=is_main_process, num_processes=1)


HOLD = "import sys, time; from training.run_folder import lock_run; lock = lock_run(sys.argv[1]); print('held', flush=True); time.sleep(60)"  # noqa: E501


def test_a_second_run_on_one_output_dir_fails_at_once_naming_the_first(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        who = rf"in use by another training run \(pid {holder.pid} on host {socket.gethostname()}, started 20"
        with pytest.raises(RunFolderError, match=who):
            lock_run(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    logs = []
    with lock_run(tmp_path, log=logs.append):  # the kernel dropped the dead holder's lock: taken over
        assert f"pid {holder.pid}" in logs[0] and "which is gone" in logs[0]
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    with lock_run(tmp_path, log=logs.append):  # released: taken again, no takeover message for ourselves
        assert len(logs) == 1


def test_only_the_main_process_takes_the_lock(tmp_path):
    with lock_run(tmp_path):  # the main process's
        assert open_run_folder(tmp_path, rank(is_main_process=False)) is None  # another rank of the run


def test_opening_the_run_folder_removes_checkpoints_a_kill_left_incomplete(tmp_path):
    for name in ("checkpoint-10", "checkpoint-15", "checkpoint-20.tmp", "checkpoint-10.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "unet.safetensors").write_bytes(b"\0" * 100)
    (tmp_path / "checkpoint-10" / MARKER).write_text("ok\n")
    (tmp_path / "checkpoint-10.old" / MARKER).write_text("ok\n")  # superseded by checkpoint-10
    (tmp_path / "notes-checkpoint-3").mkdir()  # not ours: left alone
    logs = []
    with open_run_folder(tmp_path, rank(is_main_process=True), log=logs.append):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "notes-checkpoint-3", "run.lock"]
    assert "removed 3 incomplete checkpoint folder(s)" in logs[0]


def test_a_final_dir_holding_a_users_files_is_refused_and_kept(tmp_path):
    final = tmp_path / "photos"
    final.mkdir()
    (final / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match=r"photos'? is not empty.*sdlite did not write \(notes.txt\)"):
        prepare_final_dir(final, tmp_path / "run")
    assert (final / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("where", ["equal", "parent", "checkpoint"])
def test_a_final_dir_that_is_holds_or_sits_in_a_checkpoint_of_output_dir_is_refused(tmp_path, where):
    out = tmp_path / "run"
    final = {"equal": out, "parent": tmp_path, "checkpoint": out / "checkpoint-5" / "model"}[where]
    with pytest.raises(RunFolderError, match="output_dir|checkpoint-5"):
        prepare_final_dir(final, out)


def test_publishing_replaces_only_this_runs_earlier_final_in_one_swap(tmp_path):
    out = tmp_path / "run"
    final = prepare_final_dir(None, out)
    assert final == out.resolve() / "final"
    for version in ("first", "second"):
        staging = final_staging(final, out)
        (staging / "weights.txt").write_text(version)
        publish_final(staging, final, out, step=3)
        assert (final / "weights.txt").read_text() == version
    assert json.loads((final / FINAL_MARKER).read_text()) == {"output_dir": str(out.resolve()), "step": 3}
    assert sorted(p.name for p in final.parent.iterdir()) == ["final"]  # no staging or old copy left
    with pytest.raises(RunFolderError, match=r"the final of the run in"):
        prepare_final_dir(final, tmp_path / "another-run")  # another run's final is not ours to replace


def test_publishing_without_an_atomic_swap_still_replaces_the_final(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "_exchange", lambda a, b: False)  # an old kernel or file system
    out = tmp_path / "run"
    final = prepare_final_dir(tmp_path / "model", out)
    for version in ("first", "second"):
        staging = final_staging(final, out)
        (staging / "weights.txt").write_text(version)
        publish_final(staging, final, out)
    assert (final / "weights.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_staging_folder_sdlite_did_not_create_is_not_deleted(tmp_path):
    final = prepare_final_dir(tmp_path / "model", tmp_path / "run")
    (tmp_path / ".model.sdlite-staging").mkdir()
    (tmp_path / ".model.sdlite-staging" / "keep.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="did not create it"):
        final_staging(final, tmp_path / "run")
    assert (tmp_path / ".model.sdlite-staging" / "keep.txt").exists()


def test_a_lock_an_earlier_run_of_this_process_left_is_taken_over(tmp_path):
    """A train() that raised in a notebook keeps its lock alive with the traceback; the next one goes on."""
    leaked, logs = lock_run(tmp_path), []
    with lock_run(tmp_path, log=logs.append):
        assert "did not release its lock; taking it over" in logs[0]
    leaked.release()  # a second release does nothing
