"""Memory-driven doppelganger mining: batches in which similar identities meet.

The memory head reports, after each step, the most similar other classes in its memory for the
classes of the batch (:meth:`PrototypeMemory.nearest_classes`). :class:`NeighbourTable` keeps the
latest report per class; :class:`MiningBatchSampler` composes each later global batch from the
epoch's shuffled groups, and for every class it places there it pulls one unused group of its
nearest reported neighbour forward into the same batch, until ``mining_fraction`` of the batch
is filled that way. Groups are only moved forward, never repeated, so the epoch still uses every
group (every image) once. Every rank holds the same table (the reports come from the gathered
batch) and composes the same global batch, then takes its slice.

Batches are composed lazily, when a loader asks for them, so the reports of a step shape the
batches the loader requests after it (with a fixed look-ahead of the loader's prefetch queue).
A resume inside an epoch recomposes the epoch's first batches from the saved table, so the rest
of that epoch may differ from an uninterrupted run (every image is still used at most once).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .sampler import GroupedBatchSampler, epoch_groups

__all__ = ["NeighbourTable", "MiningBatchSampler"]


class NeighbourTable:
    """class -> most similar other classes (nearest first), as last reported."""

    def __init__(self) -> None:
        self.neighbours: dict[int, tuple[int, ...]] = {}

    def update(self, classes: np.ndarray, neighbours: np.ndarray) -> None:
        """Record ``neighbours[i]`` (``-1`` = none) as the nearest classes of ``classes[i]``."""
        for c, row in zip(np.asarray(classes).tolist(), np.asarray(neighbours).reshape(len(classes), -1).tolist()):
            self.neighbours[int(c)] = tuple(int(n) for n in row if n >= 0 and n != c)

    def state_dict(self) -> dict:
        classes = np.array(sorted(self.neighbours), dtype=np.int64)
        width = max((len(v) for v in self.neighbours.values()), default=0)
        table = np.full((len(classes), width), -1, dtype=np.int64)
        for i, c in enumerate(classes.tolist()):
            row = self.neighbours[c]
            table[i, : len(row)] = row
        return {"classes": classes, "neighbours": table}

    def load_state_dict(self, state: dict) -> None:
        self.neighbours = {}
        self.update(np.asarray(state["classes"]), np.asarray(state["neighbours"]))


class _EpochComposer:
    """Composes the global batches of one epoch in order, pulling neighbour groups forward."""

    def __init__(self, sampler: "MiningBatchSampler", epoch: int) -> None:
        self.sampler = sampler
        self.groups = epoch_groups(sampler.labels, sampler.samples_per_class, sampler.seed, epoch)
        self.group_class = sampler.labels[self.groups[:, 0]]
        order = np.argsort(self.group_class, kind="stable")  # epoch order kept inside each class
        self.by_class = order
        classes, starts, counts = np.unique(self.group_class[order], return_index=True, return_counts=True)
        self.class_index = {int(c): i for i, c in enumerate(classes.tolist())}
        self.class_next = starts.copy()
        self.class_end = starts + counts
        self.used = np.zeros(len(self.groups), dtype=bool)
        self.cursor = 0
        self.composed: list[np.ndarray] = []

    def _take_of_class(self, c: int) -> int | None:
        i = self.class_index.get(c)
        if i is None:
            return None
        while self.class_next[i] < self.class_end[i]:
            g = int(self.by_class[self.class_next[i]])
            self.class_next[i] += 1
            if not self.used[g]:
                return g
        return None

    def _take_next(self) -> int | None:
        while self.cursor < len(self.groups) and self.used[self.cursor]:
            self.cursor += 1
        return self.cursor if self.cursor < len(self.groups) else None

    def compose_next(self) -> np.ndarray:
        """The next global batch as a (world_size * groups_per_batch, K) array of positions."""
        s = self.sampler
        per_step = s.groups_per_batch * s.world_size
        quota = int(s.mining_fraction * per_step)
        chosen: list[int] = []
        in_batch: set[int] = set()
        while len(chosen) < per_step:
            g = self._take_next()
            if g is None:  # tail: complete from the start of the epoch's order (drop_last=False)
                g = len(self.composed) * per_step + len(chosen)
                g = g % len(self.groups)
            else:
                self.used[g] = True
            chosen.append(g)
            c = int(self.group_class[g])
            in_batch.add(c)
            if quota and len(chosen) < per_step:
                for n in s.table.neighbours.get(c, ()):
                    if n in in_batch:
                        continue
                    h = self._take_of_class(n)
                    if h is not None:
                        self.used[h] = True
                        chosen.append(h)
                        in_batch.add(n)
                        quota -= 1
                        break
        batch = self.groups[np.array(chosen[:per_step])]
        self.composed.append(batch)
        return batch


class _LazyRankBatches(Sequence):
    """This rank's batches of an epoch, composed on first access (in order)."""

    def __init__(self, composer: _EpochComposer, length: int, start: int) -> None:
        self.composer, self.length, self.start = composer, length, start

    def __len__(self) -> int:
        return self.length - self.start

    def __getitem__(self, index):
        if isinstance(index, slice):
            raise TypeError("mining batches are composed in order; index them one by one")
        index += self.start
        if not 0 <= index < self.length:
            raise IndexError(index)
        while len(self.composer.composed) <= index:
            self.composer.compose_next()
        s = self.composer.sampler
        batch = self.composer.composed[index].reshape(s.world_size, s.groups_per_batch * s.samples_per_class)
        return batch[s.rank]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


class MiningBatchSampler(GroupedBatchSampler):
    """:class:`GroupedBatchSampler` whose batches bring reported doppelgangers together."""

    def __init__(self, labels: np.ndarray, batch_size: int, samples_per_class: int = 2, rank: int = 0,
                 world_size: int = 1, seed: int = 0, drop_last: bool = True, *,
                 table: NeighbourTable | None = None, mining_fraction: float = 0.5) -> None:
        super().__init__(labels, batch_size, samples_per_class, rank, world_size, seed, drop_last)
        if not 0.0 <= mining_fraction <= 1.0:
            raise ValueError(f"mining_fraction must be in [0, 1], got {mining_fraction}")
        self.table = table if table is not None else NeighbourTable()
        self.mining_fraction = float(mining_fraction)

    def batches_from(self, epoch: int, start: int = 0) -> Sequence:
        """This rank's batches of ``epoch`` from batch ``start`` on, composed lazily."""
        composer = _EpochComposer(self, epoch)
        return _LazyRankBatches(composer, len(self), start)

    def epoch_batches(self, epoch: int | None = None) -> np.ndarray:
        """All batches of the epoch with the current table (composes the whole epoch)."""
        lazy = self.batches_from(self.epoch if epoch is None else epoch)
        return np.stack(list(lazy))

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        for b, batch in enumerate(self.batches_from(self.epoch, start), start=start):
            self._position = b + 1
            yield batch.tolist()
