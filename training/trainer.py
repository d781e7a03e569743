"""The loop both trainers share: the step cadence, the update with its non-finite guard, checkpoints.

A trainer (``UNetTrainer`` in train.py, ``VAETrainer`` in train_vae.py) builds its model, optimizer and
data in ``setup``, then runs ``loop``: its own ``train_step`` once per optimizer step, and at the loop's
host-sync points (log and checkpoint steps) everything that needs the host: the count of skipped
non-finite steps, the logged means, the checkpoint and the stop signal. Every call into
training/checkpoint.py, run_folder.py, resume.py and peers.py is in this file (the run folder's lock,
``resume``, ``save_checkpoint``, ``check_nonfinite``, the final folder, the collective timeout), so that
checkpoint policy changes in one place for both trainers.

The run folder (README: Reliability): ``__init__`` locks output_dir before anything is written there
(a second run on it fails naming the first's pid) and checks the final folder before any training
(a folder of the user's files, or output_dir itself, is refused); the lock is held until ``train``
returns or raises (``release``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from training.checkpoint import (
    NonFiniteLossError,
    checkpoints,
    nonfinite_count,
    save_checkpoint,
)
from training.config.keys import save_yaml, to_dict
from training.config.sections import Config
from training.metrics import Metrics, progress_bar
from training.optim import EMA
from training.peers import answering, set_collective_timeout, startup_timeout
from training.resume import resume
from training.run_folder import (
    final_save_error,
    final_staging,
    open_run_folder,
    prepare_final_dir,
    publish_final,
)
from training.sharding import grad_norm, local
from training.signals import StopSignals

NONFINITE_IN_A_ROW = 10  # skipped steps in a row that end a run: a healthy run has at most a stray one


class Trainer:
    """A training run of ``cfg.optimizer.max_steps`` optimizer steps.

    A subclass defines ``make_accelerator``, ``final_path`` and ``setup`` (which sets the attributes below,
    ``start_step`` from ``resume``), ``train_step`` and ``checkpoint_modules``; ``evaluate`` and
    ``eval_every`` for periodic evaluation. Its ``train`` calls ``release`` in a ``finally``."""

    project = "sdlite-train"  # the trackers' project name
    cfg: Config
    accelerator: object  # accelerate.Accelerator
    params: list  # the trained parameters (clipped, checked, averaged)
    optimizer: object  # accelerate's AcceleratedOptimizer
    lr_schedule: object
    ema: EMA | None = None  # on the main process only; sharded, on every process (its shards)
    sharding = None  # training/sharding.py's Sharding when the trainer shards its model (FSDP), else None
    global_batch: int  # images per optimizer step, over all processes
    start_step: int = 0
    eval_every = 0  # steps between ``evaluate`` calls in the loop; 0: none
    lock = None  # the run folder's RunLock (main process), held from __init__ until release
    final: Path  # the folder the result is published to, checked at start-up

    def __init__(self, cfg: Config):
        """Lock output_dir, check the final folder, then build everything (``setup``): ready for
        ``start_step``. A failure on the way releases the lock."""
        cfg.check()
        self.cfg = cfg
        self.accelerator = acc = self.make_accelerator()
        set_collective_timeout(acc, startup_timeout(cfg.run.collective_timeout))  # training/peers.py
        # before anything is written there, and before the model is built
        lock_args = dict(log=acc.print, resume=cfg.run.resume, max_steps=cfg.optimizer.max_steps)
        self.lock = open_run_folder(cfg.run.output_dir, acc, **lock_args)
        try:
            self.final = prepare_final_dir(self.final_path(), cfg.run.output_dir)  # fails before training
            self.setup()
            set_collective_timeout(acc, cfg.run.collective_timeout)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let another run use output_dir (the end of ``train``, or a failed start)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ---- what a subclass defines ----------------------------------------------------------------------

    def make_accelerator(self):
        """The run's accelerate.Accelerator (training/accelerator.py's setup_accelerator)."""
        raise NotImplementedError

    def final_path(self) -> str | Path | None:
        """Where the result is published (None: output_dir/final)."""
        return None

    def setup(self) -> None:
        """Build the model, optimizer and data; resume; start the logs."""
        raise NotImplementedError

    def train_step(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step: (values to log, on the device; whether it was skipped as non-finite)."""
        raise NotImplementedError

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds of the model, by file name."""
        raise NotImplementedError

    def evaluate(self, step: int) -> None:
        """Measure the model in the middle of the run (every eval_every steps)."""

    def progress(self, logs: dict[str, float]) -> dict[str, str]:
        """The progress bar's postfix at a log step."""
        return {"loss": f"{logs['loss']:.4f}", "img_s": f"{logs['images_per_second']:.1f}"}

    # ---- the update -----------------------------------------------------------------------------------

    def update(self, bad_loss: torch.Tensor) -> torch.Tensor:
        """Clip, step the optimizer and the schedule, zero the gradients; returns whether the step was
        skipped because the loss (``bad_loss``) or the gradients were NaN or inf (on the device)."""
        nonfinite = self.skip_if_nonfinite(bad_loss)
        self.optimizer.step()
        if not self.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no step, so the schedule waits
            self.lr_schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        vars(self.optimizer.optimizer).pop("found_inf", None)
        return nonfinite

    def skip_if_nonfinite(self, bad_loss: torch.Tensor) -> torch.Tensor:
        """Clip the gradients and arrange for the coming optimizer step to change nothing if the loss or
        the gradients are not finite; returns that flag (on the device), for the loop to count.

        Without a host sync: the flag goes to the optimizer as ``found_inf``, the tensor by which torch's
        fused Adam/AdamW kernels skip a step on the device (moments, step count and weights untouched),
        as GradScaler uses them. The gradient norm is taken after DDP's all-reduce, so every process
        makes the same choice. Under fp16 the GradScaler already skips steps with inf gradients (its
        scale search makes a few) and sets found_inf itself; the flag then only counts non-finite
        losses. Other optimizers (bitsandbytes, non-fused AdamW) have no found_inf: for them the flag
        is read on the host, one sync per step.
        """
        acc, max_norm = self.accelerator, self.cfg.optimizer.max_grad_norm
        if acc.scaler is not None:
            if max_norm > 0:
                acc.clip_grad_norm_(self.params, max_norm)
            return bad_loss
        if self.sharding:  # the norm of DTensor shards: each process's part, summed over all (sharding.py)
            norm = grad_norm(self.params, max_norm)
        elif max_norm > 0:
            norm = acc.clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # A non-finite loss makes non-finite gradients; the norm alone decides, as it is the same everywhere.
        bad = ~torch.isfinite(norm.to(bad_loss.device))
        optimizer = self.optimizer.optimizer  # accelerate's wrapper holds the torch optimizer
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = bad.float()
        elif bad.item():
            optimizer.zero_grad(set_to_none=True)  # no gradients: the optimizer skips every parameter
        return bad | bad_loss

    # ---- the loop -------------------------------------------------------------------------------------

    def loop(self) -> None:
        """Steps start_step .. max_steps - 1, then return (the caller evaluates and saves the result).

        Faults (README: Reliability): a step whose loss or gradients are NaN or inf changes nothing
        (``update``); such steps are counted at the host-sync points and reported, or with
        nonfinite_loss=stop raised there, before any checkpoint of that window is written. SIGTERM or
        SIGINT: a checkpoint after the current step, then exit 128 + the signal.
        """
        cfg, acc = self.cfg, self.accelerator
        metrics = Metrics(acc, images_per_step=self.global_batch)
        bar = progress_bar(acc, cfg.optimizer.max_steps, self.start_step)
        nonfinite, since = torch.zeros((), device=acc.device), self.start_step  # skipped steps since `since`
        streak, done = torch.zeros((), device=acc.device), self.start_step  # skipped steps in a row
        with (
            StopSignals() as stop,
            contextlib.closing(bar),
            answering(acc, cfg.run.collective_timeout, lambda: done, cfg.run.output_dir),
        ):
            for step in range(self.start_step, cfg.optimizer.max_steps):
                values, skipped = self.train_step(step)
                metrics.add(**values)
                nonfinite += skipped
                streak = (streak + 1) * skipped
                done = step + 1
                bar.update(1)
                logging = done % cfg.run.log_every == 0 or done == cfg.optimizer.max_steps
                # A checkpoint every checkpoint_every steps and at the end, so that a finished run can go on.
                saving = bool(cfg.run.checkpoint_every) and (
                    done % cfg.run.checkpoint_every == 0 or done == cfg.optimizer.max_steps
                )
                if logging or saving:  # the loop's only host syncs
                    count, in_a_row = acc.reduce(torch.stack([nonfinite, streak]), "max").tolist()
                    self.check_nonfinite(int(count), since, done, int(in_a_row))
                    nonfinite.zero_()
                    since = done
                if logging:
                    logs = metrics.report(done, lr=self.lr_schedule.get_last_lr()[0], **self.learning_rates())
                    bar.set_postfix(self.progress(logs))
                if saving:
                    self.save_checkpoint(done)
                signum = stop.requested(acc, synced=logging or saving)
                if signum:  # SIGTERM, Ctrl-C: keep this step's state and go
                    if not saving:
                        self.save_checkpoint(done)
                    acc.print(
                        f"{signal.Signals(signum).name}: stopped after step {done} with "
                        f"checkpoint-{done} in output_dir; continue with --resume latest"
                    )
                    acc.end_training()
                    raise SystemExit(128 + signum)
                if self.eval_every and done % self.eval_every == 0 and done < cfg.optimizer.max_steps:
                    self.evaluate(done)

    def check_nonfinite(self, count: int, since: int, done: int, in_a_row: int = 0) -> None:
        """Report the steps since..done whose loss or gradients were NaN or inf (each skipped). Whatever
        nonfinite_loss says, stop if the last ``in_a_row`` steps all were: every step since the start (or
        the resume), or the last NONFINITE_IN_A_ROW, or at the run's end its later half. Such a model no
        longer trains (a learning rate far too high, damaged weights), and its checkpoints would push the
        good ones out; a short run's first step can still be finite while it breaks the weights."""
        if not count:
            return
        steps = f"step {done}" if done - since == 1 else f"steps {since + 1}..{done}"
        what = f"{count} step(s) of {steps} had a NaN or inf loss or gradients"
        run = done - self.start_step
        if in_a_row >= min(
            NONFINITE_IN_A_ROW, run if done < self.cfg.optimizer.max_steps else max(1, (run + 1) // 2)
        ):
            last = checkpoints(self.cfg.run.output_dir)
            first = f"the last {in_a_row} steps"
            if in_a_row == done - self.start_step:
                first = "every step since the " + ("resume" if self.start_step else "start")
            raise NonFiniteLossError(
                f"{first} (to step {done}) had a NaN or inf loss or gradients: the model no longer trains, "
                "so the run stops and publishes nothing; the last checkpoint is "
                f"{str(last[-1]) if last else 'none'} (weights from before these steps). Lower "
                "learning_rate; if the run resumed, its checkpoint may be damaged: resume from an earlier one"
            )
        if self.cfg.run.nonfinite_loss == "stop":
            last = checkpoints(self.cfg.run.output_dir)
            raise NonFiniteLossError(
                f"{what} (nonfinite_loss=stop); they were skipped, so the weights are finite, and no "
                f"checkpoint was written after them; the last one is {str(last[-1]) if last else 'none'}. "
                "Try a lower learning_rate, bf16 instead of fp16 or max_grad_norm > 0; nonfinite_loss=skip "
                "trains past them"
            )
        self.accelerator.print(f"warning: {what}; those steps were skipped (weights unchanged)")

    # ---- the run folder and its checkpoints -------------------------------------------------------------

    def learning_rates(self) -> dict[str, float]:
        """``lr/<name>`` of every optimizer param group (named by its "name" key, else its position)."""
        groups = self.optimizer.param_groups
        return {f"lr/{group.get('name', index)}": group["lr"] for index, group in enumerate(groups)}

    def resume(self) -> int:
        """Load the checkpoint ``cfg.run.resume`` names, if any, after checking the config against the
        checkpoint's (training.resume: a change that would alter what that run trained is refused
        unless named in allow_config_change); returns the step to start from."""
        cfg, acc = self.cfg, self.accelerator
        base_lrs = list(self.lr_schedule.base_lrs)  # this config's rates, before the checkpoint's
        found = resume(acc, cfg.run.output_dir, cfg.run.resume, self.checkpoint_modules(), self.optimizer,
                       self.lr_schedule, self.ema, config=to_dict(cfg), allow=cfg.run.allow_config_change,
                       base_lrs=base_lrs, log=acc.print)  # fmt: skip
        if found is None:  # a new run: open_run_folder refused a folder holding an earlier run's checkpoints
            return 0
        acc.print(f"resumed from {found.checkpoint} at step {found.state['step']}")
        return found.state["step"]

    def save_checkpoint(self, step: int) -> Path:
        return save_checkpoint(
            self.accelerator,
            self.cfg.run.output_dir,
            step,
            self.checkpoint_modules(),
            self.optimizer,
            self.lr_schedule,
            self.ema,
            self.cfg.run.checkpoints_total_limit,
            config=to_dict(self.cfg),
        )

    def start_logs(self) -> None:
        """Write output_dir/config.yaml and start the trackers, with the config as hyperparameters."""
        if self.accelerator.is_main_process:
            Path(self.cfg.run.output_dir).mkdir(parents=True, exist_ok=True)
            save_yaml(self.cfg, Path(self.cfg.run.output_dir) / "config.yaml")
            hparams = {
                k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in to_dict(self.cfg).items()
            }
            self.accelerator.init_trackers(self.project, config=hparams)

    @contextlib.contextmanager
    def publishing(self) -> Iterator[Path]:
        """On the main process: an empty staging folder to write the result into; when the block ends
        without an error, it replaces ``self.final`` in one atomic step, marked as this run's (a folder
        of someone else's files there is refused, before anything is written)."""
        if not self.sharding:  # sharded: every process checked its own shards before (check_finite_weights)
            self.check_finite_weights()
        staging = final_staging(self.final, self.cfg.run.output_dir)
        try:
            yield staging
            publish_final(staging, self.final, self.cfg.run.output_dir, step=self.cfg.optimizer.max_steps)
        except Exception as e:  # not only WRITE_ERRORS: tokenizers' writer raises a bare Exception
            end = f"checkpoint-{self.cfg.optimizer.max_steps}"
            done = [p for p in checkpoints(self.cfg.run.output_dir) if p.name == end]
            weights = [t for m in self.checkpoint_modules().values() for t in m.state_dict().values()]
            needed = sum(t.numel() * t.element_size() for t in weights) * (2 if self.ema else 1)
            raise final_save_error(e, self.final, staging, needed, done[0] if done else None) from e

    def check_finite_weights(self) -> None:
        """NonFiniteLossError, before the final folder is touched, if the trained weights or their EMA hold
        NaN or inf (a learning rate so high one step overflowed): such a model is never published.
        Sharded, every process calls it and counts its own shards."""
        tensors = [p.detach() for p in self.params] + (self.ema.shadow if self.ema else [])
        bad = nonfinite_count([local(t) for t in tensors])
        if self.sharding:
            bad = int(self.accelerator.reduce(torch.tensor(bad, device=self.accelerator.device), "sum"))
        if bad:
            last = checkpoints(self.cfg.run.output_dir)
            raise NonFiniteLossError(
                f"the trained weights hold {bad:,} NaN or inf values, so no final model is published "
                f"({self.final} is as it was). The last checkpoint is {str(last[-1]) if last else 'none'}; "
                "--resume latest passes over checkpoints whose weights are not finite. Lower learning_rate"
            )


def leave(status: int = 0) -> None:
    """End a training script at once, without running destructors. After a two-process gloo run
    (torch 2.13), freeing the DDP model could block for good in the process group's destructor (it
    joins a worker thread) once the other process had left: seen as a finished run that never exited.
    By now every file is written and accelerate's end_training has destroyed the process group."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
