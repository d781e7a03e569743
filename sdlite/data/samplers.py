"""The trainer's batch samplers, in one place: what they share (``StepBatches``: a global batch per
optimizer step, cut into micro-batches by process and accumulation step) and the three of them:
``StepSampler`` (plain epochs), ``BucketSampler`` (aspect buckets, repeats, per-draw caption keys as its
options) and ``PriorPairSampler`` (DreamBooth: a class half after each micro-batch of another sampler).

A sampler sets ``start_step``, ``max_steps``, ``batch_size``, ``num_processes``, ``process_index`` and
``accumulation_steps`` and defines ``step_items(step)``, the step's global batch in position order;
micro-step a of process r takes positions (a * num_processes + r) * batch_size onward, so a step's
global batch is the same however it is split, and resuming at step s starts the iteration there.
Every random draw of a sampler (an epoch's order, a step's flips) comes from ``seeded_generator``.
``StepSampler`` is the plain one: epochs of the items in an order drawn from (seed, epoch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sdlite.data.captions import MAX_REPEATS
from sdlite.data.dataset import DataError


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


class BucketSampler(StepBatches):
    """A batch sampler for the optimizer steps ``start_step`` .. ``max_steps - 1``, each from one bucket.

    Items: row r appears ``repeats[r]`` times per epoch (1 each without ``repeats``), as items
    first[r] .. first[r + 1] - 1 (``first``: the running sum of the counts, so that a row's repeats
    are a count, never a list). Epoch e: each bucket's items in an order drawn from (seed, e, bucket),
    its last short run filled by repeating them from its start, cut into runs of
    G = batch_size * num_processes * accumulation_steps; the runs of all buckets then in an order drawn
    from (seed, e). Step s takes the next run; micro-step a of process r takes positions
    (a * num_processes + r) * batch_size onward, as StepSampler. Items come as (row, flip), the flip
    drawn from (seed, step) when ``random_flip``; with ``draw_keys`` as (row, flip, epoch, item), item
    being the row's place among the epoch's items (for draw_caption). ``bucket_of_rows`` None: one
    bucket (a StepSampler with repeats that drops no image).
    """

    def __init__(
        self,
        bucket_of_rows: Sequence[int] | None,
        batch_size: int,
        seed: int,
        max_steps: int,
        start_step: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        accumulation_steps: int = 1,
        random_flip: bool = False,
        repeats: Sequence[int] | None = None,
        num_rows: int | None = None,
        draw_keys: bool = False,
    ):
        if bucket_of_rows is None:
            bucket_of_rows = [0] * (num_rows if num_rows is not None else len(repeats or []))
        self.bucket_of_rows = list(bucket_of_rows)
        counts = (
            np.ones(len(self.bucket_of_rows), np.int64) if repeats is None else np.asarray(repeats, np.int64)
        )
        if counts.shape != (len(self.bucket_of_rows),) or (counts < 0).any():
            raise ValueError("repeats must give a count >= 0 for every row")
        if (counts > MAX_REPEATS).any():
            raise ValueError(f"a row repeats {counts.max()} times, over the limit of {MAX_REPEATS}")
        self.first = np.concatenate([[0], np.cumsum(counts)])  # row r's items: first[r] .. first[r + 1] - 1
        self.num_items, self.batch_size, self.seed = int(self.first[-1]), batch_size, seed
        if self.num_items == 0:
            raise ValueError("no training items: every row repeats 0 times")
        self.max_steps, self.start_step = max_steps, start_step
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps, self.random_flip, self.draw_keys = accumulation_steps, random_flip, draw_keys
        self.global_batch = batch_size * num_processes * accumulation_steps
        # bucket -> its rows that have items, in row order (so its items in item order), and where each
        # row's items start among the bucket's.
        self.items_of_bucket: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        of_rows = np.asarray(self.bucket_of_rows, np.int64)
        for bucket in sorted(set(of_rows[counts > 0].tolist())):
            rows = np.flatnonzero((of_rows == bucket) & (counts > 0))
            self.items_of_bucket[bucket] = (rows, np.concatenate([[0], np.cumsum(counts[rows])]))
        G = self.global_batch
        runs = [-(-int(starts[-1]) // G) for _, starts in self.items_of_bucket.values()]
        # The runs (steps) of an epoch, numbered bucket after bucket: the i-th bucket's start at first_run[i].
        self.bucket_ids, self.first_run = list(self.items_of_bucket), np.concatenate([[0], np.cumsum(runs)])
        self.steps_per_epoch = int(self.first_run[-1])
        self._epoch, self._plan = -1, None

    def epoch_plan(self, epoch: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Each bucket's order of its items in the epoch, and the epoch's steps in order as runs: run
        first_run[i] + k is the k-th run of the i-th bucket."""
        if epoch != self._epoch:
            orders = {
                bucket: torch.randperm(
                    int(starts[-1]), generator=seeded_generator(self.seed, "bucket", epoch, bucket)
                )
                for bucket, (_, starts) in self.items_of_bucket.items()
            }
            steps = torch.randperm(
                self.steps_per_epoch, generator=seeded_generator(self.seed, "steps", epoch)
            )
            self._epoch, self._plan = epoch, (orders, steps)
        return self._plan

    def _run(self, step: int) -> tuple[int, int, int]:
        """(epoch, bucket, run of the bucket) of a step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        run = int(self.epoch_plan(epoch)[1][k])
        i = int(np.searchsorted(self.first_run, run, side="right")) - 1
        return epoch, self.bucket_ids[i], run - int(self.first_run[i])

    def step_bucket(self, step: int) -> int:
        """The bucket of a step (its latent shape for the step's noise draws)."""
        return self._run(step)[1]

    def step_items(self, step: int) -> list[tuple]:
        """The global batch of one optimizer step, in position order."""
        epoch, bucket, run = self._run(step)
        rows, starts = self.items_of_bucket[bucket]
        G, order = self.global_batch, self.epoch_plan(epoch)[0][bucket].numpy()
        places = order[(run * G + np.arange(G)) % len(order)]  # the short run filled from the start
        j = np.searchsorted(starts, places, side="right") - 1  # which of the bucket's rows holds each
        row_of = rows[j]
        items = self.first[row_of] + places - starts[j]
        if self.random_flip:
            flips = torch.rand(G, generator=seeded_generator(self.seed, "flip", step)) < 0.5
        else:
            flips = torch.zeros(G, dtype=torch.bool)
        if self.draw_keys:
            return [(r, f, epoch, i) for r, f, i in zip(row_of.tolist(), flips.tolist(), items.tolist())]
        return list(zip(row_of.tolist(), flips.tolist()))


class PriorPairSampler(StepBatches):
    """The instance sampler's micro-batches, each followed by as many class items (see module docstring).

    Class items: a step's G class items (G: the instance sampler's global batch) are a run of the class
    rows (of the step's bucket, with buckets) in an order drawn from (seed, cycle), a cycle being the
    n // G steps that take disjoint runs of n class rows (n < G: each step takes them all, repeated).
    So they are deterministic in (seed, step): resume and DDP slicing stay exact. The flip of a class
    item is drawn from (seed, step) too. ``global_batch`` and ``positions`` count both halves (2G, 2B);
    ``draw_positions`` places a micro-batch's random draws so that every split of a step draws alike.
    """

    def __init__(
        self,
        instance_sampler,
        class_rows: Sequence[int],
        seed: int,
        class_buckets: Sequence[int] | None = None,
    ):
        if not class_rows:
            raise ValueError("prior preservation needs class rows")
        self.inner, self.seed = instance_sampler, seed
        self.batch_size = 2 * instance_sampler.batch_size
        self.global_batch = 2 * instance_sampler.global_batch
        self.num_items = instance_sampler.num_items
        self.max_steps, self.start_step = instance_sampler.max_steps, instance_sampler.start_step
        self.num_processes, self.process_index = (
            instance_sampler.num_processes,
            instance_sampler.process_index,
        )
        self.accumulation_steps = instance_sampler.accumulation_steps
        self.by_bucket = class_buckets is not None
        self.class_of_bucket: dict[int, list[int]] = {}
        for row, bucket in zip(class_rows, class_buckets or [0] * len(class_rows)):
            self.class_of_bucket.setdefault(bucket, []).append(row)
        if class_buckets is not None:
            needed = set(getattr(instance_sampler, "items_of_bucket", {})) - set(self.class_of_bucket)
            if needed:
                raise DataError(
                    f"aspect buckets {sorted(needed)} hold instance images but no class images: "
                    "generate class images in those sizes or turn aspect_buckets off"
                )

    @property
    def flags(self) -> torch.Tensor:
        """(2B,) True at the class items of every micro-batch."""
        b = self.inner.batch_size
        return torch.arange(2 * b) >= b

    def class_items(self, step: int, count: int, arity: int) -> list[tuple]:
        """The ``count`` class items of a step: distinct rows while the bucket has that many."""
        bucket = self.step_bucket(step) if self.by_bucket else 0
        rows = self.class_of_bucket[bucket]
        n = len(rows)
        if n >= count:  # a cycle is n // count steps, each a disjoint run of one order
            cycle, k = divmod(step, n // count)
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle))
            chosen = order[k * count : (k + 1) * count].tolist()
        else:  # fewer class images than a step holds: each step repeats them all
            cycle = step
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle)).tolist()
            chosen = [order[p % n] for p in range(count)]
        if getattr(self.inner, "random_flip", False):
            flips = (
                torch.rand(count, generator=seeded_generator(self.seed, "class-flip", step)) < 0.5
            ).tolist()
        else:
            flips = [False] * count
        # The same shape as the instance items: (row, flip) or (row, flip, cycle, place) with draw_keys.
        return [(rows[c], f, cycle, c)[:arity] for c, f in zip(chosen, flips)]

    def step_items(self, step: int) -> list[tuple]:
        """The global batch (2 G) in position order: each micro-batch's instances, then its class items."""
        instances = self.inner.step_items(step)
        arity = len(instances[0])
        classes = self.class_items(step, len(instances), arity)
        b, out = self.inner.batch_size, []
        for start in range(0, len(instances), b):
            out += instances[start : start + b] + classes[start : start + b]
        return out

    def step_bucket(self, step: int) -> int:
        return self.inner.step_bucket(step) if hasattr(self.inner, "step_bucket") else 0

    def positions(self, micro_step: int) -> slice:
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    def draw_positions(self, micro_step: int) -> torch.Tensor:
        """Where this process's micro-batch takes its random draws in the step's 2G: instance item k of
        the step at k, class item k at G + k. So an item's noise and timestep do not depend on how the
        step is split into processes and micro-steps (``positions`` interleaves the halves by B)."""
        inner = self.inner.positions(micro_step)
        mine = torch.arange(inner.start, inner.stop)
        return torch.cat([mine, self.inner.global_batch + mine])
