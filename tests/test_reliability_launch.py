"""SIGTERM through ``accelerate launch`` with one process (README: Reliability).

accelerate 1.15's one-process launcher neither forwards SIGTERM nor waits: ``python -m
training.launch`` (accelerate's launch command, forwarding and waiting) keeps the README's
promise, a checkpoint and then exit 143, for SIGTERM to the launcher and to its process group; and a
trainer that calls ``follow_launcher`` still stops with a checkpoint when a plain launcher is killed.
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlite.data.shapes import write_dataset
from training.checkpoint import checkpoints
from training.train import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # more than the interrupted runs reach; the last one runs to the end
ACCELERATE = ["--num_processes", "1", "--cpu", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no"]  # fmt: skip
LAUNCHER = [sys.executable, "-m", "training.launch", *ACCELERATE]
PLAIN = [str(Path(sys.executable).parent / "accelerate"), "launch", *ACCELERATE]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("shapes"), count=8, seed=0)


def flags(data, out, **overrides) -> list[str]:
    values = dict(train_data_dir=data, output_dir=out, cache_dir=out.parent / "cache", max_steps=STEPS,
                  train_batch_size=4, learning_rate=1e-3, log_every=1, checkpoint_every=0, ema_decay=0.9,
                  report_to="none", seed=0, resume="latest")  # fmt: skip
    values.update(overrides)
    return [text for key, value in values.items() for text in (f"--{key}", str(value))]


def start(command: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip  # its own process group


def wait_for_a_step(process: subprocess.Popen, deadline: float) -> None:
    """Read the trainer's log until it reports a finished step (log_every=1 prints a loss each step)."""
    for line in process.stdout:
        if "step 1:" in line or "loss=" in line or "it/s" in line or "s/it" in line:
            return
        assert time.monotonic() < deadline, "the trainer made no progress"
    raise AssertionError("the trainer ended before its first step")


def newest_step(out: Path) -> int:
    found = checkpoints(out)
    return int(found[-1].name.split("-")[1]) if found else 0


def test_sigterm_to_the_launcher_or_its_group_waits_for_the_checkpoint_and_exits_143(data, tmp_path):
    out, deadline = tmp_path / "run", time.monotonic() + 120
    train = [*LAUNCHER, str(ROOT / "training" / "train.py"), *flags(data, out)]
    for send in (lambda p: p.send_signal(signal.SIGTERM), lambda p: os.killpg(p.pid, signal.SIGTERM)):
        before = newest_step(out)
        process = start(train)
        try:
            wait_for_a_step(process, deadline)
            send(process)
            log = process.communicate(timeout=60)[0]
        finally:
            with contextlib.suppress(ProcessLookupError):  # whatever of its group is left
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        # 143, not -15: the launcher was not killed; it waited for the trainer and exits with its status
        assert process.returncode == 128 + signal.SIGTERM, log[-3000:]
        assert "SIGTERM: stopped after step" in log and before < newest_step(out) < STEPS
    main(flags(data, out))  # the rest of the run (in this process: one launcher start less)
    whole = tmp_path / "whole"
    main(flags(data, whole, resume="none"))
    for part in ("unet_raw", "unet"):  # stopped twice, then resumed: the uninterrupted run's weights
        a, b = (load_file(next((o / "final" / part).glob("*.safetensors"))) for o in (out, whole))
        assert all(torch.equal(a[k], b[k]) for k in a), part


FOLLOWER = """
import os, signal, sys, time
from training.launch import follow_launcher
stop = []
signal.signal(signal.SIGTERM, lambda number, frame: stop.append(number))  # what StopSignals records
print("following", follow_launcher(), flush=True)
while not stop:
    time.sleep(0.01)
time.sleep(0.5)  # the checkpoint
open(sys.argv[1], "w").write("saved")
sys.exit(128 + stop[0])
"""


def test_a_trainer_following_its_launcher_stops_with_a_checkpoint_when_plain_accelerate_launch_is_killed(
    tmp_path,
):
    """Plain ``accelerate launch``: the launcher ends at once on SIGTERM (accelerate's behaviour); a trainer
    that called follow_launcher gets SIGTERM from the kernel and writes its checkpoint, not training on."""
    script, saved = tmp_path / "trainer.py", tmp_path / "checkpoint"
    script.write_text(FOLLOWER)
    process = start([*PLAIN, str(script), str(saved)])
    try:
        assert process.stdout.readline().strip() == "following True"  # under the one-process launcher
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)  # the launcher ended
        # Killed by the signal (-15) as a rule; one loaded CI run here saw it exit 143 instead, not
        # reproduced in 32 runs (with and without load) nor explained: what is ours is the trainer's save.
        assert process.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not saved.exists():  # the orphaned trainer was told by the kernel, and saves
            assert time.monotonic() < deadline, "the trainer did not stop when its launcher ended"
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the trainer too, if it outlived the launcher
            os.killpg(process.pid, signal.SIGKILL)
    assert saved.read_text() == "saved"


def test_a_cpu_run_trains_on_the_machines_cores_not_accelerates_one_thread(monkeypatch):
    from accelerate.commands.launch import launch_command_parser

    import training.launch as launcher

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("sdlite.cli.physical_cores", lambda: 8)
    parse = launch_command_parser().parse_args
    one = parse(["--config_file", str(ROOT / "accelerate_config.yaml"), "train.py"])
    assert launcher.cpu_threads(one) == 8  # accelerate alone: OMP_NUM_THREADS=1
    two = parse(["--config_file", str(ROOT / "accelerate_config.yaml"), "--num_processes", "2", "train.py"])
    assert launcher.cpu_threads(two) == 4
    assert launcher.cpu_threads(parse(["--num_cpu_threads_per_process", "3", "train.py"])) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's standing choice: accelerate passes it on
    assert launcher.cpu_threads(one) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert launcher.cpu_threads(one) is None  # a GPU trains: accelerate's setting stands


def test_an_empty_omp_num_threads_is_taken_as_unset_not_handed_to_accelerate(monkeypatch):
    """OMP_NUM_THREADS= (empty) is unset to OpenMP; accelerate's launcher reads it with int() and raised."""
    import accelerate.commands.launch as accelerate_launch

    import training.launch as launcher

    launched = []
    monkeypatch.setenv("OMP_NUM_THREADS", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # accelerate's own thread count then
    monkeypatch.setattr(accelerate_launch, "simple_launcher", lambda args: launched.append(args))
    assert launcher.main(["--num_processes", "1", "--mixed_precision", "no", "train.py"]) == 0
    assert launched and "OMP_NUM_THREADS" not in os.environ
