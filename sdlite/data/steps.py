"""What every batch sampler of the trainer shares: a global batch per optimizer step, cut into
micro-batches by process and accumulation step.

A sampler sets ``start_step``, ``max_steps``, ``batch_size``, ``num_processes``, ``process_index`` and
``accumulation_steps`` and defines ``step_items(step)``, the step's global batch in position order;
micro-step a of process r takes positions (a * num_processes + r) * batch_size onward, so a step's
global batch is the same however it is split, and resuming at step s starts the iteration there.
Every random draw of a sampler (an epoch's order, a step's flips) comes from ``seeded_generator``.
``StepSampler`` is the plain one: epochs of the items in an order drawn from (seed, epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch


def seeded_generator(*keys, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose stream is a function of ``keys`` alone, e.g. (seed, "noise", step)."""
    h = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") >> 1)


class StepBatches:
    def step_items(self, step: int) -> list[tuple]:
        raise NotImplementedError

    def positions(self, micro_step: int) -> slice:
        """This process's positions in the global batch at micro-step ``micro_step``."""
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    def draw_positions(self, micro_step: int) -> slice | torch.Tensor:
        """Where this process's micro-batch takes its random draws in the step's global batch: its own
        positions, unless a sampler places its items otherwise (DreamBooth's class halves)."""
        return self.positions(micro_step)

    def start_at(self, step: int) -> None:
        """Iterate from optimizer step ``step`` on (a resumed run's first)."""
        self.start_step = step

    def __iter__(self) -> Iterator[list[tuple]]:
        for step in range(self.start_step, self.max_steps):
            items = self.step_items(step)
            for a in range(self.accumulation_steps):
                yield items[self.positions(a)]

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accumulation_steps


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
