"""The machinery of a training loop, for any model: accelerator, data order, optimizer, learning-rate
schedule, EMA, metrics and progress; checkpoints and signals are in ``training/checkpoint.py``.

Nothing here knows about U-Nets or VAEs; ``train.py`` and ``train_vae.py`` build their loops from it.

Resuming continues a run exactly. Everything random in a step is drawn from generators seeded by
(seed, step) (``seeded_generator``), the data order is a function of (seed, epoch) (``StepSampler``),
and a checkpoint holds the weights, the optimizer, the schedule, the EMA and every process's global
RNG state: a run stopped and resumed gives the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from sdlite.data.steps import StepBatches, seeded_generator


def setup_accelerator(
    output_dir: str | Path,
    mixed_precision: str | None = None,
    gradient_accumulation_steps: int = 1,
    report_to: str | None = "tensorboard",
    allow_tf32: bool = True,
) -> Accelerator:
    """The Accelerator of a run; logs go to ``output_dir/logs``. mixed_precision None: accelerate's
    config or launch flags decide."""
    # `accelerate launch --multi_gpu` on a machine without GPUs starts the processes, but accelerate
    # then runs each on its own; cpu=True joins them in one DDP group over gloo.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    # Refuse sharded launches before building anything. The launch's environment is the test, not the
    # Accelerator's type: with cpu=True accelerate quietly runs an FSDP config as DDP (DeepSpeed too).
    launch = {"FSDP": "ACCELERATE_USE_FSDP", "DeepSpeed": "ACCELERATE_USE_DEEPSPEED"}
    sharded = [name for name, variable in launch.items() if os.environ.get(variable, "").lower() == "true"]
    if not sharded:
        accelerator = Accelerator(
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=gradient_accumulation_steps,
            log_with=report_to or None,
            project_dir=str(Path(output_dir) / "logs"),
            cpu=cpu,
        )
        if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            sharded = [accelerator.distributed_type.value]
    if sharded:
        raise NotImplementedError(
            f"{sharded[0]}: sdlite's checkpoints and EMA assume every process holds whole parameters and "
            "optimizer state (one process or DDP): launch with configs/accelerate/ddp.yaml (one machine) or "
            "multi-node.yaml (several); docs/scale-out.md says what sharded training still needs"
        )
    if allow_tf32 and torch.cuda.is_available():  # TF32 matmuls on Ampere and later: ~fp32 accuracy
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


class StepSampler(StepBatches):
    """A batch sampler for the optimizer steps ``start_step`` .. ``max_steps - 1``: ordered by (seed, epoch).

    Epoch e visits a permutation of the items drawn from (seed, e). Step s takes the next
    G = batch_size * num_processes * accumulation_steps items of its epoch (an epoch's last short run
    is dropped); micro-step a of process r takes positions (a * num_processes + r) * batch_size onward.
    So a step's global batch is the same however it is split into processes and accumulation steps,
    and resuming at step s skips nothing: iteration starts there. Each item comes as (index, flip),
    the flip drawn from (seed, step) when ``random_flip``.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        seed: int,
        max_steps: int,
        start_step: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        accumulation_steps: int = 1,
        random_flip: bool = False,
    ):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.max_steps, self.start_step = max_steps, start_step
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps, self.random_flip = accumulation_steps, random_flip
        self.global_batch = batch_size * num_processes * accumulation_steps
        self.steps_per_epoch = num_items // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{num_items} training items cannot fill one step's global batch of {self.global_batch} "
                f"(batch {batch_size} x {num_processes} processes x {accumulation_steps} accumulation)"
            )
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = torch.randperm(
                self.num_items, generator=seeded_generator(self.seed, "order", epoch)
            )
        return self._order

    def step_items(self, step: int) -> list[tuple[int, bool]]:
        """The global batch of one optimizer step, in position order."""
        epoch, k = divmod(step, self.steps_per_epoch)
        indices = self.epoch_order(epoch)[k * self.global_batch : (k + 1) * self.global_batch].tolist()
        if self.random_flip:
            flips = torch.rand(self.global_batch, generator=seeded_generator(self.seed, "flip", step)) < 0.5
        else:
            flips = torch.zeros(self.global_batch, dtype=torch.bool)
        return list(zip(indices, flips.tolist()))


def make_optimizer(
    params: Iterable[torch.nn.Parameter] | list[dict],
    lr: float,
    betas=(0.9, 0.999),
    weight_decay=1e-2,
    eps=1e-8,
    use_8bit: bool = False,
) -> torch.optim.Optimizer:
    """AdamW: fused (one kernel for all parameters) where the device has it, or bitsandbytes' 8-bit.
    ``params`` may be param groups ({"params": [...], "lr": ...}), each at its own learning rate."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [dict(g, params=[p for p in g["params"] if p.requires_grad]) for g in params]
    else:
        params = [p for p in params if p.requires_grad]
    kw = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
    if use_8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "use_8bit_adam needs bitsandbytes (pip install bitsandbytes, or sdlite[bnb]), which needs "
                "a CUDA GPU; or set use_8bit_adam false"
            ) from None
        return bnb.optim.AdamW8bit(params, **kw)
    try:
        return torch.optim.AdamW(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, foreach=True, **kw)


def make_lr_schedule(optimizer, name: str, warmup_steps: int, max_steps: int):
    """A diffusers.optimization schedule in optimizer steps: step it once per optimizer step, and do not
    pass it to ``accelerator.prepare``, which would step it once per process (diffusers' script bug)."""
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


class EMA:
    """Exponential moving average of parameters; decay at update k: min(decay, (1+k)/(10+k)), as diffusers."""

    def __init__(self, parameters: Iterable[torch.nn.Parameter], decay: float = 0.9999):
        self.decay, self.updates = decay, 0
        self.shadow = [p.detach().clone().float() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in parameters], 1 - decay)

    @contextlib.contextmanager
    def swapped_into(self, parameters: Iterable[torch.nn.Parameter]):
        """Inside the block the parameters hold the averages (swapped, not copied: no extra memory)."""
        parameters = list(parameters)
        for p, s in zip(parameters, self.shadow):
            p.data, s.data = s.data.to(p.dtype), p.data
        try:
            yield
        finally:
            for p, s in zip(parameters, self.shadow):
                p.data, s.data = s.data, p.data.float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"{i}"])
        self.updates = updates


# ---- metrics and progress -----------------------------------------------------------------------------


class Metrics:
    """Sums per-step values on the device and talks to the host only when it reports."""

    def __init__(self, accelerator: Accelerator, images_per_step: int):
        self.accelerator, self.images_per_step = accelerator, images_per_step
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.start = 0, time.perf_counter()

    def add(self, **values: torch.Tensor) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def report(self, step: int, **extra: float) -> dict[str, float]:
        """Means since the last report over all processes (every process calls it), images/s, ``extra``."""
        names = sorted(self.sums)
        means = self.accelerator.reduce(
            torch.stack([self.sums[n] for n in names]) / max(self.steps, 1), "mean"
        )
        seconds = time.perf_counter() - self.start
        logs = dict(zip(names, means.tolist()))
        logs["images_per_second"] = self.images_per_step * self.steps / max(seconds, 1e-9)
        logs.update(extra)
        self.accelerator.log(logs, step=step)
        self.sums, self.steps, self.start = {}, 0, time.perf_counter()
        return logs


def progress_bar(accelerator: Accelerator, total: int, initial: int = 0, desc: str = "steps") -> tqdm:
    return tqdm(total=total, initial=initial, desc=desc, disable=not accelerator.is_local_main_process)


def log_image(accelerator: Accelerator, tag: str, image, step: int) -> None:
    """Send a PIL image to TensorBoard, when it is a tracker."""
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
