"""What a training loop reports: per-step values summed on the device and sent to the host only at
log steps (``Metrics``), the progress bar, and images for TensorBoard."""

from __future__ import annotations

import time

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


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
