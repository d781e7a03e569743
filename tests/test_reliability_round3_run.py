"""Issue 33, the run folder's part: start-up deletes only what sdlite wrote (item 1), a checkpoint's
damaged tensors are found and a run that no longer trains publishes nothing (item 3), a stopped process
ends the run in bounded time naming it (item 7), and a full disk while saving the final model or
converting a LoRA says what was written and what to free (item 11). The tiny preset on 16 shapes
images, batch 4, a few steps.
"""

import contextlib
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load_file

from sdlite import lora_command
from sdlite.data.shapes import write_dataset
from sdlite.kohya import LoraFileError, convert_lora_file
from sdlite.lora import LoraSettings, add_lora, save_lora
from sdlite.models import Components, build_components
from training.checkpoint import MARKER, NonFiniteLossError, checkpoints
from training.peers import PeerTimeoutError, answering
from training.run_folder import FINAL_MARKER, FinalSaveError, RunFolderError, open_run_folder
from training.train import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=16, seed=0)


def flags(data, out, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=Path(data).parent / "cache", max_steps=2,
                  train_batch_size=4, learning_rate=1e-3, log_every=1, checkpoint_every=1,
                  checkpoints_total_limit=3, ema_decay=0.9, report_to="none", seed=0)  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


class MainProcess:  # what open_run_folder asks of an Accelerator, on one process
    is_main_process, num_processes = True, 1


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- item 1: start-up deletes only what sdlite wrote ----------------------------------------------------


@pytest.mark.parametrize(
    "name, files",
    [
        ("checkpoint-500", {"model.safetensors": b"w", "optimizer.bin": b"o", "random_states_0.pkl": b"r"}),
        ("checkpoint-500", {"unet/diffusion_pytorch_model.safetensors": b"w" * 64}),  # diffusers' scripts
        ("checkpoint-3.tmp", {"notes.txt": b"mine"}),
    ],
    ids=["accelerate", "diffusers", "notes"],
)
def test_start_up_refuses_a_checkpoint_named_folder_sdlite_did_not_write_and_keeps_it(tmp_path, name, files):
    for relative, content in files.items():
        (tmp_path / name / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name / relative).write_bytes(content)
    with pytest.raises(
        RunFolderError, match=rf"holds {name} .*sdlite did not write.*move it out of output_dir"
    ):
        open_run_folder(tmp_path, MainProcess())
    assert files_under(tmp_path / name) == files
    assert not (tmp_path / "run.lock").exists()  # refused before the lock: nothing written


def test_start_up_still_removes_leftovers_of_ours_marked_or_of_our_file_names(tmp_path):
    (tmp_path / "checkpoint-7.tmp").mkdir()  # a new save killed early: its mark, a file being written
    (tmp_path / "checkpoint-7.tmp" / ".sdlite-checkpoint").write_text("")
    (tmp_path / "checkpoint-7.tmp" / "unet.safetensors.partial").write_bytes(b"\0")
    (tmp_path / "checkpoint-9").mkdir()  # half-deleted by an older sdlite: only our file names
    for name in ("optimizer.pt", "rng-0.safetensors", "text_encoder_lora.safetensors"):
        (tmp_path / "checkpoint-9" / name).write_bytes(b"\0")
    logs = []
    with open_run_folder(tmp_path, MainProcess(), log=logs.append):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lock"]
    assert "removed 2 incomplete checkpoint folder(s)" in logs[0]


@pytest.mark.parametrize("output_dir", ["", "."])
def test_the_current_folder_as_output_dir_is_refused_and_nothing_in_it_deleted(
    data, tmp_path, monkeypatch, output_dir
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint-3.tmp").mkdir()
    (tmp_path / "checkpoint-3.tmp" / "unet.safetensors").write_bytes(b"mine")  # our name, not our folder
    with pytest.raises((RunFolderError, ValueError), match="output_dir"):
        main(flags(data, output_dir))
    assert (tmp_path / "checkpoint-3.tmp" / "unet.safetensors").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3.tmp"]


# ---- item 3: damaged checkpoints and runs that no longer train -------------------------------------------


def garble(file: Path) -> None:
    """Random bytes in place of a safetensors file's tensors; its header intact."""
    raw = bytearray(file.read_bytes())
    start = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[start:] = torch.randint(0, 256, (len(raw) - start,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes()  # fmt: skip
    file.write_bytes(bytes(raw))
    with safetensors.safe_open(file, "pt") as f:  # still readable: only its numbers are garbage
        assert len(list(f.keys())) > 0


@pytest.fixture(scope="module")
def three_steps(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("three") / "run"
    main(flags(data, out, max_steps=3))
    return out


def copy_run(source: Path, to: Path) -> Path:
    """A copy of a finished run, its final marked as the copy's own."""
    subprocess.run(["cp", "-a", str(source), str(to)], check=True)
    marker = json.loads((to / "final" / FINAL_MARKER).read_text())
    (to / "final" / FINAL_MARKER).write_text(json.dumps(marker | {"output_dir": str(to.resolve())}))
    return to


def finite(file: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(file).values())


@pytest.mark.parametrize("checksums", [True, False], ids=["checksummed", "older-sdlite"])
def test_a_checkpoint_with_garbage_tensors_under_an_intact_header_is_passed_over_for_the_one_before(
    data, tmp_path, three_steps, capsys, checksums
):
    out = copy_run(three_steps, tmp_path / "run")
    if not checksums:  # a checkpoint of an sdlite before checksums: its marker says "ok"
        for folder in checkpoints(out):
            (folder / MARKER).write_text("ok\n")
    garble(out / "checkpoint-3" / "unet.safetensors")
    main(flags(data, out, max_steps=5, resume="latest"))
    log = capsys.readouterr().out
    why = "is corrupt: its bytes no longer match the sha256" if checksums else "NaN or inf weights"
    assert "checkpoint-3 does not load" in log and why in log, log[-2000:]
    assert "resumed from" in log and "checkpoint-2 at step 2" in log
    if not checksums:
        assert "checkpoint-2 has no checksums" in log
    for part in ("unet", "unet_raw"):
        assert finite(next((out / "final" / part).glob("*.safetensors")))


def nan_loss(monkeypatch) -> None:
    from training import train as train_module

    real = train_module.diffusion_loss
    monkeypatch.setattr(train_module, "diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))


def test_a_resumed_run_whose_every_step_is_nonfinite_stops_before_writing_or_publishing(
    data, tmp_path, three_steps, monkeypatch
):
    out = copy_run(three_steps, tmp_path / "run")
    before = {p.name: files_under(p) for p in checkpoints(out)}
    final = files_under(out / "final")
    nan_loss(monkeypatch)  # e.g. weights damaged in a way no check sees
    with pytest.raises(NonFiniteLossError, match=r"every step since the resume .*checkpoint-3"):
        main(flags(data, out, max_steps=5, resume="latest"))
    assert {p.name: files_under(p) for p in checkpoints(out)} == before  # no checkpoint rotated out
    assert files_under(out / "final") == final  # the earlier final stands


def test_a_learning_rate_of_1e30_stops_the_run_after_ten_nonfinite_steps_in_a_row(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"the last 10 steps \(to step 11\).*publishes nothing"):
        main(flags(data, out, max_steps=14, learning_rate=1e30, checkpoint_every=0))
    assert not (out / "final").exists()


def test_a_short_run_at_a_learning_rate_of_1e30_publishes_nothing(data, tmp_path):
    out = tmp_path / "run"  # its first step is finite and makes the weights about 1e30; the rest are not
    with pytest.raises(NonFiniteLossError, match=r"the last 2 steps \(to step 3\).*publishes nothing"):
        main(flags(data, out, max_steps=3, learning_rate=1e30, checkpoint_every=0, log_every=1))
    assert not (out / "final").exists()


def test_weights_that_are_not_finite_are_never_published(data, tmp_path):
    out = tmp_path / "run"  # 1e39 overflows float32: the one step, its loss finite, makes the weights inf
    with pytest.raises(NonFiniteLossError, match=r"trained weights hold .* NaN or inf.*checkpoint-1"):
        main(flags(data, out, max_steps=1, learning_rate=1e39))
    assert not (out / "final").exists()


# ---- item 11: a full disk while saving the final model or converting a LoRA -----------------------------

NO_SPACE = "No space left on device (os error 28)"


def test_a_full_disk_while_saving_the_final_model_says_what_and_keeps_the_earlier_final(
    data, tmp_path, three_steps, monkeypatch
):
    out = copy_run(three_steps, tmp_path / "run")
    final = files_under(out / "final")
    real = Components.save_pretrained

    def fill_the_disk(self, path, *args, **kwargs):
        (Path(path) / "tokenizer").mkdir(parents=True)
        (Path(path) / "tokenizer" / "vocab.json").write_bytes(b"{")
        raise Exception(NO_SPACE)  # what tokenizers' writer raises

    monkeypatch.setattr(Components, "save_pretrained", fill_the_disk)
    with pytest.raises(FinalSaveError) as failed:
        main(flags(data, out, max_steps=4, resume="latest"))
    message = str(failed.value)
    assert "could not write the final model to" in message and NO_SPACE in message
    assert "the final folder there is as it was" in message and "checkpoint-4" in message
    assert "Free at least" in message and "--resume latest" in message
    assert files_under(out / "final") == final  # the earlier final, whole
    assert sorted(p.name for p in out.iterdir() if "final" in p.name) == ["final"]  # no partial copy left
    monkeypatch.setattr(Components, "save_pretrained", real)
    main(flags(data, out, max_steps=4, resume="latest"))  # space freed: the same run publishes
    assert json.loads((out / "final" / FINAL_MARKER).read_text())["step"] == 4


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    parts = build_components("tiny", seed=0)
    add_lora(parts.unet, None, LoraSettings(rank=4, alpha=4.0, text_encoder=False))
    return save_lora(tmp_path_factory.mktemp("lora"), parts.unet, None, base_model="tiny")


def test_a_full_disk_while_converting_a_lora_says_what_and_keeps_the_existing_file(
    lora_file, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "lora_kohya.safetensors"
    out.write_bytes(b"the earlier conversion")
    real = safetensors.torch.save_file

    def fill_the_disk(tensors, file, metadata=None):
        Path(file).write_bytes(b"\0" * 100)
        raise safetensors.SafetensorError(f"Error while serializing: IoError({NO_SPACE})")

    monkeypatch.setattr(safetensors.torch, "save_file", fill_the_disk)
    said = rf"could not write .*{re.escape(NO_SPACE)}.*existing lora_kohya.safetensors is unchanged. Free"
    with pytest.raises(LoraFileError, match=said):
        convert_lora_file(lora_file, out, to="kohya", overwrite=True)
    assert lora_command.main([str(lora_file), str(out), "--to", "kohya", "--overwrite"]) == 2
    assert capsys.readouterr().err.count("\n") == 1  # one line, no traceback
    assert out.read_bytes() == b"the earlier conversion"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora_kohya.safetensors"]  # no .partial
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert convert_lora_file(lora_file, out, to="kohya", overwrite=True) == out


# ---- item 7: a stopped process ------------------------------------------------------------------------


def local_rank_of(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    found = [v.split(b"=", 1)[1].decode() for v in env if v.startswith(b"LOCAL_RANK=")]
    return found[0] if found else None


def trainer_pids(cmdline_part: str) -> dict[str, int]:
    """LOCAL_RANK -> pid of this user's processes whose command line holds ``cmdline_part``."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if cmdline_part in cmdline and "accelerate" not in cmdline and local_rank_of(int(entry)):
                found[local_rank_of(int(entry))] = int(entry)
    return found


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; its parent has not yet collected it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_process_ends_the_run_in_bounded_time_naming_it_and_the_resume_point(data, tmp_path):
    """The main process suspended (SIGSTOP) mid-run: the other ends within collective_timeout, saying so
    itself (errors are otherwise reported by the main process, which here cannot)."""
    stop, other = 0, 1
    out, timeout = tmp_path / "run", 4
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    command = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
               str(free_port()), str(ROOT / "training" / "train.py"),
               *flags(data, out, max_steps=10_000, train_batch_size=2, checkpoint_every=2, ema_decay="none",
                      collective_timeout=timeout, cache_dir=tmp_path / "cache")]  # fmt: skip
    launcher = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)  # fmt: skip
    lines, stopped = [], None
    threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not checkpoints(out):  # training has begun
            assert launcher.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
            time.sleep(0.1)
        pids = trainer_pids(str(out))
        stopped = pids[str(stop)]
        os.kill(stopped, signal.SIGSTOP)
        at = time.monotonic()
        while running(pids[str(other)]) and time.monotonic() - at < timeout + 30:
            time.sleep(0.1)
        waited = time.monotonic() - at  # until the other process had ended
    finally:  # the launcher and its processes, started here (the stopped one first: it left the group)
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(stopped, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    log = "".join(lines)
    assert f"process {other} of 2" in log, log[-3000:]
    assert f"waited {timeout} s after step" in log and f"for process {stop} to answer" in log, log[-3000:]
    assert waited < timeout + 20, log[-3000:]  # ended, not hanging on after its message
    resume_point = checkpoints(out)[-1]
    assert f"the last checkpoint, {resume_point}, is the resume point" in log
    assert finite(resume_point / "unet.safetensors")


@pytest.mark.parametrize("seconds", ["0", "-5", "nan", "inf"])
def test_a_collective_timeout_that_is_not_a_positive_number_of_seconds_is_refused(seconds, tmp_path):
    with pytest.raises(ValueError, match=r"collective_timeout=\S+: use a finite number > 0 \(default 600\)"):
        main(flags(tmp_path / "data", tmp_path / "run", collective_timeout=seconds))
    assert not (tmp_path / "run").exists()


def test_a_timed_out_collective_names_both_processes_and_other_errors_pass_through(tmp_path):
    main_process = SimpleNamespace(num_processes=2, process_index=0, is_main_process=True)
    gloo = "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 4000ms for recv operation to complete"
    with pytest.raises(
        PeerTimeoutError, match=r"process 0 of 2 .* after step 7 for process 1 to answer.*no checkpoint"
    ):
        with answering(main_process, 4, lambda: 7, tmp_path):
            raise RuntimeError(gloo)
    for accelerator, error in [(main_process, RuntimeError("CUDA out of memory")),
                               (SimpleNamespace(num_processes=1), RuntimeError(gloo))]:  # fmt: skip
        with pytest.raises(RuntimeError) as raised, answering(accelerator, 4, lambda: 7, tmp_path):
            raise error
        assert raised.value is error
