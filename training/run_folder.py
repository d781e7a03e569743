"""The run folder (output_dir) and the final folder: one run at a time, and nothing deleted it did not write.

    lock = open_run_folder(cfg.output_dir, acc, log=acc.print)  # every process, before anything is written
    final = prepare_final_dir(cfg.final_dir, cfg.output_dir)     # at start-up: fails before training
    ...                                                          # main process, at the end:
    staging = final_staging(final, cfg.output_dir)               # an empty folder beside final, to fill
    <write the model into staging>
    publish_final(staging, final, cfg.output_dir, step=cfg.max_steps)
    if lock: lock.release()                                      # in a finally (None on other processes)

The lock is an ``fcntl.flock`` on ``output_dir/run.lock``, which the kernel drops when the process
ends however it ends (SIGKILL included): so a lock is never left behind by a dead process, and the
file's JSON only says who held it last. Only the main process of a run takes it (with several
processes, ``accelerate launch`` starts them all for one run, and only the main one writes the folder).
flock works on local file systems; on NFS it needs the lock daemon (README: Reliability).
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from training.checkpoint import (
    CHECKPOINT,
    _agree,
    checkpoints,
    find_resume,
    foreign_folders,
    fsync_tree,
    remove_leftovers,
)

LOCK_FILE = "run.lock"
FINAL_MARKER = "sdlite_final.json"  # in every final folder a run published: whose it is
STAGING_MARKER = ".sdlite_staging"  # in a staging folder while it is being written


class RunFolderError(RuntimeError):
    """An output_dir or final_dir this run must not use (in use by another run, or holding other files)."""


class FinalSaveError(RuntimeError):
    """The final model could not be written (a full disk, a read-only folder); the earlier final is intact."""


# ---- the lock -------------------------------------------------------------------------------------------


class RunLock:
    """An exclusive lock on a run folder, held until ``release`` (or the process ends)."""

    def __init__(self, path: Path, file):
        self.path, self._file = path, file
        _HELD[path.resolve()] = self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
            _HELD.pop(self.path.resolve(), None)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# The locks this process holds: a run that ended without releasing its lock (an exception kept alive by
# a notebook or a test) must not lock this process out of its own folder.
_HELD: dict[Path, RunLock] = {}


def _holder_text(info: dict) -> str:
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def lock_run(output_dir: str | Path, log: Callable[[str], None] = print) -> RunLock:
    """Take the run folder's lock, or raise RunFolderError naming the process that holds it."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    if path.resolve() in _HELD:
        log(f"{path}: an earlier run in this process did not release its lock; taking it over")
        _HELD[path.resolve()].release()
    file = open(path, "a+")  # noqa: SIM115 (held open for the lock's life); a+: never truncates another's
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        file.seek(0)
        try:
            holder = _holder_text(json.loads(file.read() or "{}"))
        except ValueError:
            holder = "a process that has not yet written its name"
        file.close()
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise RunFolderError(
                f"cannot lock {str(path)!r} ({e}); is the file system NFS without locks?"
            ) from e
        raise RunFolderError(
            f"output_dir {str(folder)!r} is in use by another training run ({holder}). Two runs in one "
            "folder overwrite each other's checkpoints; wait for it to end, stop it, or choose another "
            "output_dir"
        ) from None
    file.seek(0)
    try:
        previous = json.loads(file.read() or "{}")
    except ValueError:
        previous = {}
    pid, host = previous.get("pid"), previous.get("host")
    if pid is not None and pid != os.getpid():  # the kernel dropped its lock: that process is gone
        gone = host != socket.gethostname() or not _alive(int(pid))
        how = "which is gone" if gone else "which no longer holds it"
        log(f"{path}: taking over the lock of an earlier run ({_holder_text(previous)}), {how}")
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}  # fmt: skip
    file.seek(0)
    file.truncate()
    file.write(json.dumps(me) + "\n")
    file.flush()
    return RunLock(path, file)


def check_output_dir(output_dir: str | Path) -> None:
    """RunFolderError, before anything is written or deleted, for an output_dir the run would harm: the
    current folder ("" or ".") unless an earlier run made it its run folder, or one holding folders named
    like our checkpoints that sdlite did not write (start-up removes unfinished checkpoints of ours)."""
    folder = Path(output_dir)
    if folder.resolve() == Path.cwd().resolve() and not (folder / LOCK_FILE).is_file():
        raise RunFolderError(
            f"output_dir {str(output_dir)!r} is the current folder, which is not a run folder: a run writes "
            "checkpoints, logs and its final model there; name a folder for the run, e.g. runs/my-run"
        )
    foreign = foreign_folders(folder)
    if foreign:
        sample = ", ".join(sorted(p.name for p in foreign[0].iterdir())[:4]) if foreign[0].is_dir() else ""
        raise RunFolderError(
            f"output_dir {str(folder)!r} holds {foreign[0].name}"
            + (f" ({sample})" if sample else "")
            + f", which sdlite did not write{f' (and {len(foreign) - 1} more)' if len(foreign) > 1 else ''}: "
            "sdlite would take it for a checkpoint of its own; move it out of output_dir, or choose another "
            "output_dir"
        )


def check_resume(output_dir: str | Path, resume: str | None, max_steps: int) -> None:
    """RunFolderError, before the model is built, for a run that contradicts the checkpoints it finds: a
    new run (no resume) in a folder holding an earlier run's checkpoints, whose rotation would push them
    out and whose final model would replace that run's; a resume whose max_steps is below the
    checkpoint's step (max_steps counts the whole run, not the steps to add)."""
    found = checkpoints(output_dir)
    if not resume and found:
        raise RunFolderError(
            f"output_dir {str(output_dir)!r} holds {found[-1].name} of an earlier run: continue that run "
            "with --resume latest, or give this run another output_dir"
        )
    checkpoint = find_resume(output_dir, resume) if resume else None
    named = CHECKPOINT.match(checkpoint.name) if checkpoint else None
    step = int(named[1]) if named else 0
    if step > max_steps:
        raise RunFolderError(
            f"--resume {resume} continues {checkpoint.name}, which has trained {step} steps, past "
            f"max_steps {max_steps} (the whole run's steps, not the steps to add): give --max_steps "
            f"{step} or more"
        )


def open_run_folder(
    output_dir: str | Path,
    accelerator,
    log: Callable[[str], None] = print,
    resume: str | None = None,
    max_steps: int | None = None,
) -> RunLock | None:
    """The main process checks output_dir (``check_output_dir``; with ``max_steps``, also ``check_resume``),
    locks it and removes what killed runs of ours left half-written; returns the lock (None on the other
    processes: one run, one lock). If it cannot, every process raises RunFolderError at once (an
    all-reduce), instead of the others waiting for a main process that is gone. Call it (every process)
    before anything is written to output_dir."""
    lock, error = None, None
    if accelerator.is_main_process:
        try:
            check_output_dir(output_dir)
            if max_steps is not None:
                check_resume(output_dir, resume, max_steps)
            lock = lock_run(output_dir, log)
        except RunFolderError as e:
            error = e
    if not _agree(accelerator, error is None):
        raise error or RunFolderError(f"the main process could not lock {str(output_dir)!r}; see its error")
    if lock is not None:
        removed = remove_leftovers(output_dir)
        if removed:
            log(f"removed {len(removed)} incomplete checkpoint folder(s) left by a killed run: "
                + ", ".join(p.name for p in removed))  # fmt: skip
    return lock


# ---- the final folder ---------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def prepare_final_dir(final_dir: str | Path | None, output_dir: str | Path) -> Path:
    """The final folder (default output_dir/final), checked before training: RunFolderError if it is or
    holds output_dir, lies inside a checkpoint, or holds files that are not a final this run published."""
    out = Path(output_dir).resolve()
    final = Path(final_dir).resolve() if final_dir else out / "final"
    if _inside(out, final):
        raise RunFolderError(
            f"final_dir {str(final)!r} {'is' if out == final else 'holds'} output_dir {str(out)!r}: "
            "publishing the final model there would delete the run's checkpoints, config and logs. "
            "Choose a final_dir outside output_dir, or leave it unset (output_dir/final)"
        )
    for parent in final.parents:
        if parent.parent == out and CHECKPOINT.match(parent.name):
            raise RunFolderError(
                f"final_dir {str(final)!r} lies inside checkpoint {str(parent)!r}, which rotation deletes; "
                "choose another final_dir"
            )
    if final.exists() and not final.is_dir():
        raise RunFolderError(f"final_dir {str(final)!r} is a file, not a folder; choose another final_dir")
    owner = _owner(final) if final.is_dir() else None
    if final.is_dir() and any(final.iterdir()) and owner != str(out):
        sample = ", ".join(sorted(p.name for p in final.iterdir())[:5])
        whose = f"the final of the run in {owner!r}" if owner else f"files sdlite did not write ({sample})"
        raise RunFolderError(
            f"final_dir {str(final)!r} is not empty: it holds {whose}. sdlite replaces only a final folder "
            "its own run published; choose a new or empty folder, or move those files away"
        )
    return final


def _owner(final: Path) -> str | None:
    """The output_dir of the run that published ``final`` (from its marker), or None."""
    try:
        return json.loads((final / FINAL_MARKER).read_text()).get("output_dir")
    except (OSError, ValueError, AttributeError):
        return None


def final_staging(final: Path, output_dir: str | Path) -> Path:
    """A new, empty folder beside ``final`` to write the model into (a leftover one of ours is replaced;
    a folder of that name we did not create is an error)."""
    prepare_final_dir(final, output_dir)  # again: the folder may have changed while the run trained
    staging = final.with_name(f".{final.name}.sdlite-staging")
    if staging.exists():
        if not (staging / STAGING_MARKER).is_file():
            raise RunFolderError(f"{str(staging)!r} exists and sdlite did not create it; move it away")
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / STAGING_MARKER).write_text("sdlite writes the final model here, then renames it\n")
    return staging


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk is full: OSError's errno, or the text of safetensors' and tokenizers'
    errors (a SafetensorError, a bare Exception) that carry the OS message."""
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "os error 28" in text


def final_save_error(
    error: BaseException, final: Path, staging: Path, needed_bytes: int, resume_point: Path | None
) -> FinalSaveError:
    """The error of a failed final save, after removing the partial copy (it gives the space back): what
    was being written, that the earlier final is intact, where the weights are, and what to free."""
    shutil.rmtree(staging, ignore_errors=True)
    earlier = "the final folder there is as it was" if final.is_dir() else "no final folder was written"
    if resume_point is not None:
        kept = f"the trained weights are in {resume_point}"
        then = "then run again with --resume latest, which publishes them"
    else:
        kept = "no checkpoint holds the trained weights (checkpoint_every 0), so they end with this run"
        then = "then train again"
    if disk_full(error):
        fix = f"Free at least {needed_bytes / 1e6:,.0f} MB on the disk of {str(final.parent)!r} (the "
        fix += "trained weights; a full model folder also copies its frozen parts), "
    else:
        fix = f"Fix the cause (permissions of {str(final.parent)!r}?), "
    return FinalSaveError(
        f"could not write the final model to {str(final)!r} ({type(error).__name__}: {str(error)[:200]}); "
        f"{earlier}, and {kept}. {fix}{then}"
    )


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        rename = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # old kernel or file system
        return False
    raise OSError(code, os.strerror(code), str(a))


def publish_final(staging: Path, final: Path, output_dir: str | Path, **info) -> Path:
    """Mark ``staging`` as this run's final (``info``: e.g. step=...) and put it in ``final``'s place in one
    atomic swap: a reader, or a kill, sees the old final or the new one, never a mix or neither."""
    (staging / STAGING_MARKER).unlink()
    marker = {"output_dir": str(Path(output_dir).resolve()), **info}
    (staging / FINAL_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    fsync_tree(staging)
    if final.is_dir() and _exchange(staging, final):
        (staging / FINAL_MARKER).unlink(missing_ok=True)  # the old final, now at staging: ours, checked
        shutil.rmtree(staging)
    else:
        if final.exists():  # no atomic swap here: move the old one aside first (a kill leaves it, named)
            old = final.with_name(f".{final.name}.sdlite-old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old)
        else:
            os.replace(staging, final)
    return final
