"""``accelerate launch`` that waits for the trainer's checkpoint on SIGTERM and Ctrl-C.

    python -m training.launch [accelerate launch options] training/train.py --config ... [--key value]

What accelerate 1.15 does with signals: with one process, ``accelerate launch`` runs the script as a
child (``simple_launcher``: ``subprocess.Popen`` then ``wait``) and installs no handler. SIGTERM to
the launcher (``docker stop``, ``systemctl stop``, ``kill``) ends it at once and the trainer goes on
training on its own; SIGTERM to the process group ends the launcher before the trainer's checkpoint
exists (and in a container, the launcher as PID 1 ending kills the trainer with it); Ctrl-C ends it
with a KeyboardInterrupt traceback. With several processes it runs torchrun's agent, which forwards
the signal and waits up to 30 s: the trainer's checkpoint is written, then the launcher exits.

This module is that launcher, with the one-process case fixed: it runs accelerate's own launch command
in this process, forwards SIGTERM, SIGINT and SIGHUP to the trainer, waits for it (the trainer saves
a checkpoint and exits 128 + the signal) and exits with the trainer's status, not accelerate's
traceback. ``follow_launcher`` is the trainer's half: if the launcher dies anyway (SIGKILL), the
trainer gets SIGTERM and stops with a checkpoint instead of training with nobody waiting for it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def under_simple_launcher() -> bool:
    """Whether this process is the one trainer ``accelerate launch`` started without torchrun (which sets
    LOCAL_RANK and forwards signals itself): the launcher's settings are in ACCELERATE_* variables."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and "LOCAL_RANK" not in os.environ


def follow_launcher(signum: int = signal.SIGTERM) -> bool:
    """Under a one-process ``accelerate launch`` (Linux), ask the kernel to send ``signum`` to this process
    when the launcher dies: a trainer whose launcher was stopped then checkpoints and exits (StopSignals)
    instead of training on alone. Call it at start-up, before StopSignals is entered. True if set."""
    if not (under_simple_launcher() and sys.platform.startswith("linux")):
        return False
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent or parent == 1:  # the launcher died before the request: act on it now
        os.kill(os.getpid(), signum)
    return True


def _children() -> list[int]:
    """This process's children (Linux /proc): the trainer accelerate's launcher started."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == os.getpid():  # field 4: ppid
                pids.append(int(entry))
    return pids


def _forward(signum, frame) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"\nlauncher: {name} passed to the trainer; waiting for its checkpoint\n".encode())
    for pid in _children():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def exit_status(returncode: int) -> int:
    """A shell's exit status for a child's return code (-N: killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def cpu_threads(args) -> int | None:
    """OpenMP threads for each trainer on a machine without a GPU: its physical cores shared among the
    processes, as sdlite's other commands use them; None where accelerate's choice stands (the user set
    --num_cpu_threads_per_process or $OMP_NUM_THREADS, or a GPU trains). accelerate launch gives each
    process OMP_NUM_THREADS=1 unless its config says use_cpu, which ours does not (a GPU is used when
    there is one), so without this a CPU run trains on one core of many."""
    if args.num_cpu_threads_per_process is not None or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    from accelerate.commands.config.config_args import load_config_from_file

    from sdlite.cli import physical_cores

    processes = args.num_processes
    if processes is None:
        try:  # the config's, as accelerate reads it (no file: accelerate's one process)
            processes = load_config_from_file(args.config_file).num_processes
        except OSError:
            processes = 1
    return max(1, physical_cores() // max(1, processes or 1))


def main(argv: list[str] | None = None) -> int:
    """``accelerate launch argv`` in this process, forwarding stop signals; returns the trainer's status."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    if os.environ.get("OMP_NUM_THREADS") == "":  # unset to OpenMP; accelerate's int() of it would raise
        del os.environ["OMP_NUM_THREADS"]
    args = launch_command_parser().parse_args(argv)
    args.num_cpu_threads_per_process = cpu_threads(args) or args.num_cpu_threads_per_process
    args.quiet = False  # a failing trainer raises CalledProcessError, which carries its status
    previous = {number: signal.signal(number, _forward) for number in FORWARDED}
    try:
        launch_command(args)
    except subprocess.CalledProcessError as e:
        return exit_status(e.returncode)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    return 0


if __name__ == "__main__":
    sys.exit(main())
