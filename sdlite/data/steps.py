"""What every batch sampler of the trainer shares: a global batch per optimizer step, cut into
micro-batches by process and accumulation step.

A sampler sets ``start_step``, ``max_steps``, ``batch_size``, ``num_processes``, ``process_index`` and
``accumulation_steps`` and defines ``step_items(step)``, the step's global batch in position order;
micro-step a of process r takes positions (a * num_processes + r) * batch_size onward, so a step's
global batch is the same however it is split, and resuming at step s starts the iteration there.
Every random draw of a sampler (an epoch's order, a step's flips) comes from ``seeded_generator``.
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

    def __iter__(self) -> Iterator[list[tuple]]:
        for step in range(self.start_step, self.max_steps):
            items = self.step_items(step)
            for a in range(self.accumulation_steps):
                yield items[self.positions(a)]

    def __len__(self) -> int:
        return (self.max_steps - self.start_step) * self.accumulation_steps
