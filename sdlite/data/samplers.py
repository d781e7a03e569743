"""The trainer's batch sampler, ``StepSampler``: one class for every kind of run, its photo-set features
as options.

Step s's global batch of G = batch_size * num_processes * accumulation_steps items is a function of
(seed, s) alone, and micro-step a of process r takes its positions (a * num_processes + r) * batch_size
onward: so a step sees the same items however it is split into processes and micro-steps, and a resumed
run starts iterating at its first step, skipping nothing. Each item comes as (row, flip), the flip drawn
from (seed, step) with ``random_flip``. The options:

- ``repeats``: row r counts repeats[r] times an epoch (a caption folder's N_name folders), as a count;
- ``buckets``: row r's aspect bucket; each step draws from one bucket (``step_bucket``);
- ``caption_keys``: items come as (row, flip, epoch, item), the keys of a caption drawn anew at every
  draw (sdlite.data.captions.draw_caption), item being the row's place among the epoch's items;
- ``class_rows``: DreamBooth's class images (``PriorPairs``): each micro-batch of B instance items is
  followed by B class items of the step's bucket, so that the step's batch size and positions count both.

An epoch is ordered one of two ways. A plain data set (none of the options; ``PlainEpochs``) is one
shuffle of its rows, cut into steps, its last short run dropped. In a photo set (any of them;
``GroupedEpochs``) every photo counts: each bucket's items (all of them, without ``buckets``) are
shuffled and cut into runs of G, the last one filled from the bucket's start, and the runs of all buckets
are then shuffled. Every random draw comes from ``seeded_generator``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

from sdlite.data.captions import MAX_REPEATS
from sdlite.data.dataset import DataError


def seeded_generator(*keys, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator whose stream is a function of ``keys`` alone, e.g. (seed, "noise", step)."""
    h = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(h, "little") >> 1)


class StepRows(NamedTuple):
    """The rows of one step's instance half, in position order, and what keys their draws."""

    rows: list[int]
    epoch: int
    items: list[int]  # each row's place among the epoch's items (a repeated row has one per repeat)
    bucket: int  # the step's bucket (0 without buckets)


class PlainEpochs:
    """Epoch e visits the rows in an order drawn from (seed, e), cut into steps of G; the last short run
    is dropped."""

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        self.num_items, self.global_batch, self.seed = num_rows, global_batch, seed
        self.steps_per_epoch = num_rows // global_batch
        self._epoch, self._order = -1, None

    def epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = seeded_generator(self.seed, "order", epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_items, generator=generator)
        return self._order

    def step_rows(self, step: int) -> StepRows:
        epoch, k = divmod(step, self.steps_per_epoch)
        G = self.global_batch
        rows = self.epoch_order(epoch)[k * G : (k + 1) * G].tolist()
        return StepRows(rows, epoch, rows, 0)  # each row is one item: its place is its index

    def step_bucket(self, step: int) -> int:
        return 0


class GroupedEpochs:
    """Epochs of runs: row r is items first[r] .. first[r + 1] - 1 (``first``: the running sum of the
    counts, so that a row's repeats are a count, never a list). Epoch e: each bucket's items in an order
    drawn from (seed, e, bucket), its last short run filled by repeating them from its start, cut into
    runs of G; the runs of all buckets then in an order drawn from (seed, e)."""

    def __init__(self, bucket_of_rows: Sequence[int], counts: np.ndarray, global_batch: int, seed: int):
        self.first = np.concatenate([[0], np.cumsum(counts)])  # row r's items: first[r] .. first[r + 1] - 1
        self.num_items, self.global_batch, self.seed = int(self.first[-1]), global_batch, seed
        # bucket -> its rows that have items, in row order (so its items in item order), and where each
        # row's items start among the bucket's.
        self.items_of_bucket: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        of_rows = np.asarray(bucket_of_rows, np.int64)
        for bucket in sorted(set(of_rows[counts > 0].tolist())):
            rows = np.flatnonzero((of_rows == bucket) & (counts > 0))
            self.items_of_bucket[bucket] = (rows, np.concatenate([[0], np.cumsum(counts[rows])]))
        runs = [-(-int(starts[-1]) // global_batch) for _, starts in self.items_of_bucket.values()]
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

    def run_of(self, step: int) -> tuple[int, int, int]:
        """(epoch, bucket, run of the bucket) of a step."""
        epoch, k = divmod(step, self.steps_per_epoch)
        run = int(self.epoch_plan(epoch)[1][k])
        i = int(np.searchsorted(self.first_run, run, side="right")) - 1
        return epoch, self.bucket_ids[i], run - int(self.first_run[i])

    def step_bucket(self, step: int) -> int:
        return self.run_of(step)[1]

    def step_rows(self, step: int) -> StepRows:
        epoch, bucket, run = self.run_of(step)
        rows, starts = self.items_of_bucket[bucket]
        G, order = self.global_batch, self.epoch_plan(epoch)[0][bucket].numpy()
        places = order[(run * G + np.arange(G)) % len(order)]  # the short run filled from the start
        j = np.searchsorted(starts, places, side="right") - 1  # which of the bucket's rows holds each
        items = self.first[rows[j]] + places - starts[j]
        return StepRows(rows[j].tolist(), epoch, items.tolist(), bucket)


class MissingClassImages(DataError):
    """Buckets that hold instance images but no class image: their steps would have no class half."""

    def __init__(self, buckets: list[int]):
        self.buckets = buckets
        super().__init__(
            f"aspect buckets {buckets} hold instance images but no class images: generate class images in "
            "those sizes or turn aspect_buckets off"
        )


class PriorPairs:
    """DreamBooth's class half of a step: its G class items are a run of the class rows of the step's
    bucket in an order drawn from (seed, cycle), a cycle being the n // G steps that take disjoint runs of
    n class rows (n < G: each step takes them all, repeated). So they are a function of (seed, step):
    resume and the split into processes stay exact."""

    def __init__(self, class_rows: Sequence[int], bucket_of_rows: Sequence[int], seed: int):
        if not class_rows:
            raise ValueError("prior preservation needs class rows")
        self.seed = seed
        self.rows_of_bucket: dict[int, list[int]] = {}
        for row in class_rows:
            self.rows_of_bucket.setdefault(bucket_of_rows[row], []).append(row)

    def step_rows(self, step: int, bucket: int, count: int) -> tuple[list[int], int, list[int]]:
        """(rows, cycle, places) of a step's ``count`` class items: distinct rows while the bucket has that
        many; an item's place in its cycle's order keys its caption draws."""
        rows = self.rows_of_bucket[bucket]
        n = len(rows)
        if n >= count:  # a cycle is n // count steps, each a disjoint run of one order
            cycle, k = divmod(step, n // count)
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle))
            places = order[k * count : (k + 1) * count].tolist()
        else:  # fewer class images than a step holds: each step repeats them all
            cycle = step
            order = torch.randperm(n, generator=seeded_generator(self.seed, "class", bucket, cycle)).tolist()
            places = [order[p % n] for p in range(count)]
        return [rows[c] for c in places], cycle, places


class StepSampler:
    """The batch sampler of the optimizer steps ``start_step`` .. ``max_steps - 1`` (see the module's
    docstring): ``step_items(step)`` is the step's global batch in position order."""

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        seed: int,
        max_steps: int,
        start_step: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        accumulation_steps: int = 1,
        random_flip: bool = False,
        *,
        repeats: Sequence[int] | None = None,
        buckets: Sequence[int] | None = None,
        caption_keys: bool = False,
        class_rows: Sequence[int] | None = None,
    ):
        self.seed, self.max_steps, self.start_step = seed, max_steps, start_step
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps, self.random_flip = accumulation_steps, random_flip
        self.caption_keys = caption_keys
        self.instance_batch = batch_size  # B: a micro-batch's instance items (all of them but class items)
        G = batch_size * num_processes * accumulation_steps
        self.pairs = None
        if repeats is None and buckets is None and not caption_keys and not class_rows:
            self.epochs = PlainEpochs(num_rows, G, seed)
            if self.epochs.steps_per_epoch == 0:
                raise ValueError(
                    f"{num_rows} training items cannot fill one step's global batch of {G} "
                    f"(batch {batch_size} x {num_processes} processes x {accumulation_steps} accumulation)"
                )
        else:
            of_rows = [0] * num_rows if buckets is None else list(buckets)
            counts = instance_counts(num_rows, repeats, class_rows)
            self.epochs = GroupedEpochs(of_rows, counts, G, seed)
            if class_rows:  # each micro-batch: B instance items, then B class items
                self.pairs = PriorPairs(class_rows, of_rows, seed)
                bare = sorted(set(self.epochs.items_of_bucket) - set(self.pairs.rows_of_bucket))
                if bare:
                    raise MissingClassImages(bare)
        halves = 2 if self.pairs else 1
        self.batch_size, self.global_batch = halves * batch_size, halves * G
        self.num_items, self.steps_per_epoch = self.epochs.num_items, self.epochs.steps_per_epoch

    def step_bucket(self, step: int) -> int:
        """The bucket of a step (its latent shape for the step's noise draws); 0 without buckets."""
        return self.epochs.step_bucket(step)

    def step_items(self, step: int) -> list[tuple]:
        """The global batch of one optimizer step, in position order: with class rows, each micro-batch's
        instance items, then its class items."""
        s = self.epochs.step_rows(step)
        instances = self.as_items(s.rows, self.flips(step, "flip", len(s.rows)), s.epoch, s.items)
        if self.pairs is None:
            return instances
        rows, cycle, places = self.pairs.step_rows(step, s.bucket, len(instances))
        classes = self.as_items(rows, self.flips(step, "class-flip", len(rows)), cycle, places)
        b, out = self.instance_batch, []
        for start in range(0, len(instances), b):
            out += instances[start : start + b] + classes[start : start + b]
        return out

    def flips(self, step: int, key: str, count: int) -> list[bool]:
        if not self.random_flip:
            return [False] * count
        return (torch.rand(count, generator=seeded_generator(self.seed, key, step)) < 0.5).tolist()

    def as_items(self, rows: list[int], flips: list[bool], epoch: int, places: list[int]) -> list[tuple]:
        if self.caption_keys:
            return [(r, f, epoch, p) for r, f, p in zip(rows, flips, places)]
        return list(zip(rows, flips))

    # ---- the split of a step into processes and micro-steps ---------------------------------------------

    def positions(self, micro_step: int) -> slice:
        """This process's positions in the global batch at micro-step ``micro_step``."""
        start = (micro_step * self.num_processes + self.process_index) * self.batch_size
        return slice(start, start + self.batch_size)

    def draw_positions(self, micro_step: int) -> slice | torch.Tensor:
        """Where this process's micro-batch takes its random draws in the step's global batch: its own
        positions; with class rows, instance item k of the step at k and class item k at G + k, so that an
        item's noise and timestep do not depend on how the step is split (``positions`` interleaves the
        halves by B)."""
        if self.pairs is None:
            return self.positions(micro_step)
        b = self.instance_batch
        start = (micro_step * self.num_processes + self.process_index) * b
        mine = torch.arange(start, start + b)
        return torch.cat([mine, self.global_batch // 2 + mine])

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


def instance_counts(num_rows: int, repeats: Sequence[int] | None, class_rows: Sequence[int] | None):
    """Each row's items an epoch: its repeats (1 without), 0 for DreamBooth's class rows (drawn apart)."""
    counts = np.ones(num_rows, np.int64) if repeats is None else np.asarray(repeats, np.int64)
    if counts.shape != (num_rows,) or (counts < 0).any():
        raise ValueError("repeats must give a count >= 0 for every row")
    if (counts > MAX_REPEATS).any():
        raise ValueError(f"a row repeats {counts.max()} times, over the limit of {MAX_REPEATS}")
    counts[list(class_rows or [])] = 0
    if counts.sum() == 0:
        raise ValueError("no training items: every row repeats 0 times")
    return counts
