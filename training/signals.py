"""Stopping a run on a signal: SIGTERM / SIGINT become a checkpoint at the next step boundary and a
clean exit (``StopSignals``), the same step on every process."""

from __future__ import annotations

import os
import signal
import threading

import torch
from accelerate import Accelerator


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
