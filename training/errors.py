"""How a training script ends on an error: one line for what sdlite refuses on purpose, the traceback
for the rest.

    with reported_errors("train.py"):
        UNetTrainer(parse_config(TrainConfig)).train()

An error is sdlite's own when its class is defined in sdlite, pipelines or training (ConfigError,
DataError, CheckpointError, LoraFileError, ...), or when a ``raise`` statement of those packages
raised a plain ValueError or OSError: either way its message was written for the user, naming the
problem and its fix, and a traceback would only bury it. Anything else is a bug or a surprise, and
keeps its traceback. ``--debug`` or SDLITE_DEBUG=1 shows the traceback of every error.

Under ``accelerate launch`` every process reads the same settings and files and so meets the same
error: only the main process (RANK 0) prints it, so that it appears once. The others end as quietly,
with the same exit status.

This module imports neither torch nor any model library.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

DEBUG_ENV = "SDLITE_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_STATUS = 2  # as argparse's usage errors and the sdlite command's
_PACKAGES = ("sdlite", "pipelines", "training")
_ROOTS = tuple(str(Path(__file__).resolve().parents[1] / name) + os.sep for name in _PACKAGES)


def debugging(argv: list[str] | None = None) -> bool:
    """Whether the user asked for tracebacks: --debug on the command line or SDLITE_DEBUG set (not 0)."""
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "0").strip().lower() not in (
        "",
        "0",
        "false",
        "no",
    )


def is_ours(error: BaseException) -> bool:
    """Whether ``error`` is one sdlite raised on purpose, with a message meant for the user."""
    if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: not errors to explain
        return False
    if type(error).__module__.split(".")[0] in _PACKAGES:
        return True
    if not isinstance(error, (ValueError, OSError)) or error.__traceback__ is None:
        return False
    frame = traceback.extract_tb(error.__traceback__)[-1]  # where it was raised
    line = linecache.getline(frame.filename, frame.lineno).strip()
    return str(Path(frame.filename).resolve()).startswith(_ROOTS) and line.startswith("raise ")


def is_main_process() -> bool:
    """RANK 0, or no launcher: torchrun and accelerate launch set RANK in every process they start."""
    return os.environ.get("RANK", "0").strip() in ("", "0")


def one_line(prog: str, error: BaseException) -> str:
    """``prog: error: message``, a message of several lines (one per problem) prefixed line by line."""
    lines = [line for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    if "Original Traceback (most recent call last):" in lines:  # a DataLoader worker's, re-raised by torch
        lines = [lines[-1].removeprefix(f"{type(error).__module__}.{type(error).__qualname__}: ")]
    return "\n".join(f"{prog}: error: {line.strip()}" for line in lines)


@contextlib.contextmanager
def reported_errors(prog: str, argv: list[str] | None = None) -> Iterator[None]:
    """Inside the block, an error of sdlite's own ends the process with its message on stderr (once, by
    the main process) and exit status 2; any other error, or any under --debug, propagates as it is."""
    try:
        yield
    except Exception as e:
        if debugging(argv) or not is_ours(e):
            raise
        if is_main_process():
            print(one_line(prog, e), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STATUS) from None
