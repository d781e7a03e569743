"""How long a process of a run waits for the others, and what the run says when one stops answering.

    set_collective_timeout(acc, startup_timeout(cfg.collective_timeout))  # before the cache fill
    ...                                                                   # setup
    set_collective_timeout(acc, cfg.collective_timeout)                   # the training loop
    with answering(acc, cfg.collective_timeout, step=lambda: done, output_dir=cfg.output_dir):
        ...                                                               # the steps

Every collective (DDP's gradient all-reduce, the loop's host syncs, a checkpoint's agreement) waits
for every process. A process that stops answering (SIGSTOP, a debugger, a hung file system, a lost
machine) would hold the others for the process group's default, 30 minutes (10 with NCCL), with no
word of why. The training loop waits ``collective_timeout`` instead; start-up waits at least
STARTUP_TIMEOUT, because there one process may legitimately work alone for long: a machine whose local
latent cache is cold fills it while the others wait, and DreamBooth's class images are drawn by the
main process alone. When the wait runs out, gloo raises a RuntimeError ("Timed out waiting ...") and
``answering`` turns it into a PeerTimeoutError naming this process, the one it waited for (with two
processes; with more, gloo does not say which) and the checkpoint to resume from. With NCCL the
timeout is seen by its watchdog thread, which ends the process with its own message instead.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch.distributed as dist

from training.checkpoint import checkpoints

STARTUP_TIMEOUT = 30 * 60.0  # seconds: torch's own default for gloo, which the cache fill relied on
TIMED_OUT = re.compile(r"timed?[ -]?out", re.IGNORECASE)


class PeerTimeoutError(RuntimeError):
    """Another process of the run did not answer a collective within collective_timeout."""


def startup_timeout(collective_timeout: float) -> float:
    """The wait at start-up (cache fill, class images): collective_timeout, and never below 30 minutes."""
    return max(collective_timeout, STARTUP_TIMEOUT)


def set_collective_timeout(accelerator, seconds: float) -> bool:
    """Make the run's process group give up on a collective after ``seconds``; False with one process.
    torch sets a group's timeout when it is made (accelerate's InitProcessGroupKwargs); changing it
    later, as start-up and the loop want different ones, is torch's ``_set_pg_timeout``."""
    setter = getattr(dist.distributed_c10d, "_set_pg_timeout", None)  # torch >= 2.3
    if accelerator.num_processes == 1 or not dist.is_initialized() or setter is None:
        return False
    setter(datetime.timedelta(seconds=seconds))
    return True


def waited_for(rank: int, num_processes: int) -> str:
    if num_processes == 2:
        return f"process {1 - rank}"
    return f"one of the other {num_processes - 1} processes"


@contextlib.contextmanager
def answering(accelerator, seconds: float, step: Callable[[], int], output_dir: str | Path) -> Iterator[None]:
    """Inside the block, a collective that timed out is a PeerTimeoutError naming who waited for whom,
    at which step, and the checkpoint to resume from (``step()``: the last step finished)."""
    try:
        yield
    except RuntimeError as e:
        if accelerator.num_processes == 1 or isinstance(e, PeerTimeoutError) or not TIMED_OUT.search(str(e)):
            raise
        rank, n = accelerator.process_index, accelerator.num_processes
        last = checkpoints(output_dir)
        resume = f"the last checkpoint, {last[-1]}, is the resume point" if last else "it has no checkpoint"
        error = PeerTimeoutError(
            f"process {rank} of {n} (pid {os.getpid()}) waited {seconds:g} s after step {step()} for "
            f"{waited_for(rank, n)} to answer, which has stopped (suspended, hung, or its machine lost); the "
            f"run ends here, and {resume}: once every process runs, continue with --resume latest "
            "(collective_timeout sets how long a process waits)"
        )
        if not accelerator.is_main_process:  # errors are reported by the main process, which may be the
            print(f"error: {error}", file=sys.stderr, flush=True)  # one that stopped: this one says it
        raise error from e
