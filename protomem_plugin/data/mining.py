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

from collections import OrderedDict
from typing import Iterator

import numpy as np

from .lazy_rows import LazyRows
from .permutation import unpermute
from .sampler import GroupedBatchSampler

__all__ = ["NeighbourTable", "MiningBatchSampler"]

_LOOKAHEAD = 4096  # epoch places whose identities are located at a time
_KEEP_BEHIND = 16  # composed global batches kept behind the last one read (a loader may look back)


class NeighbourTable:
    """class -> most similar other classes (nearest first), as last reported, for at most
    ``capacity`` classes: the least recently reported are forgotten first (a memory head holds far
    fewer classes than that, and reports only on classes it holds), so the table stays bounded
    whatever the number of identities."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        if capacity < 1:
            raise ValueError(f"NeighbourTable capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.neighbours: OrderedDict[int, tuple[int, ...]] = OrderedDict()

    def update(self, classes: np.ndarray, neighbours: np.ndarray) -> None:
        """Record ``neighbours[i]`` (``-1`` = none) as the nearest classes of ``classes[i]``."""
        for c, row in zip(np.asarray(classes).tolist(), np.asarray(neighbours).reshape(len(classes), -1).tolist()):
            self.neighbours[int(c)] = tuple(int(n) for n in row if n >= 0 and n != c)
            self.neighbours.move_to_end(int(c))
        while len(self.neighbours) > self.capacity:
            self.neighbours.popitem(last=False)

    def state_dict(self) -> dict:
        """``classes`` (least recently reported first) and their ``neighbours`` rows (-1 padded)."""
        classes = np.array(list(self.neighbours), dtype=np.int64)
        width = max((len(v) for v in self.neighbours.values()), default=0)
        table = np.full((len(classes), width), -1, dtype=np.int64)
        for i, row in enumerate(self.neighbours.values()):
            table[i, : len(row)] = row
        return {"classes": classes, "neighbours": table}

    def load_state_dict(self, state: dict) -> None:
        self.neighbours = OrderedDict()
        self.update(np.asarray(state["classes"]), np.asarray(state["neighbours"]))


class _EpochComposer:
    """Composes the global batches of one epoch in order, pulling neighbour groups forward.

    Works on places of the epoch's shuffled group order (:meth:`GroupedBatchSampler.epoch_group`):
    a bit per place marks it used; the next place in order is taken unless used, and a neighbour's
    group is the earliest unused place among its identity's groups (found with the inverse
    permutation). Memory: one bit per group of the epoch plus a few composed batches.
    """

    def __init__(self, sampler: "MiningBatchSampler", epoch: int) -> None:
        self.sampler, self.epoch = sampler, int(epoch)
        self.places = sampler.num_groups
        self.key = sampler.epoch_key(epoch)
        self.used = np.zeros(-(-self.places // 8), dtype=np.uint8)
        self.cursor = 0
        self.count = 0  # global batches composed so far
        self.composed: dict[int, np.ndarray] = {}
        self._ahead_from, self._ahead = 0, np.zeros(0, dtype=np.int64)

    def _is_used(self, place: int) -> bool:
        return bool(self.used[place >> 3] & (1 << (place & 7)))

    def _mark(self, place: int) -> None:
        self.used[place >> 3] |= np.uint8(1 << (place & 7))

    def _identity_at(self, place: int) -> int:
        """Identity number of the group at ``place`` (located a window at a time)."""
        if not self._ahead_from <= place < self._ahead_from + len(self._ahead):
            s = self.sampler
            window = np.arange(place, min(place + _LOOKAHEAD, self.places))
            self._ahead_from = place
            self._ahead = s.layout.locate_groups(s.epoch_group(self.epoch, window), s.samples_per_class)[0]
        return int(self._ahead[place - self._ahead_from])

    def _take_of_class(self, label: int) -> int | None:
        s = self.sampler
        identity = s.layout.identity_of_label(label)
        if identity is None:
            return None
        first, count = s.layout.identity_groups(identity, s.samples_per_class)
        places = np.sort(unpermute(np.arange(first, first + count), self.places, self.key))
        for place in places[places >= self.cursor].tolist():  # places before the cursor are all used
            if not self._is_used(place):
                return place
        return None

    def _take_next(self) -> int | None:
        while self.cursor < self.places and self._is_used(self.cursor):
            self.cursor += 1
        return self.cursor if self.cursor < self.places else None

    def compose_next(self) -> None:
        """Compose the next global batch (positions (world_size * groups_per_batch, K))."""
        s = self.sampler
        per_step = s.groups_per_batch * s.world_size
        quota = int(s.mining_fraction * per_step)
        chosen: list[int] = []
        in_batch: set[int] = set()
        while len(chosen) < per_step:
            place = self._take_next()
            if place is None:  # tail: complete from the start of the epoch's order (drop_last=False)
                place = (self.count * per_step + len(chosen)) % self.places
            else:
                self._mark(place)
            chosen.append(place)
            c = int(s.layout.label_of(self._identity_at(place)))
            in_batch.add(c)
            if quota and len(chosen) < per_step:
                for n in s.table.neighbours.get(c, ()):
                    if n in in_batch:
                        continue
                    pulled = self._take_of_class(n)
                    if pulled is not None:
                        self._mark(pulled)
                        chosen.append(pulled)
                        in_batch.add(n)
                        quota -= 1
                        break
        groups = s.epoch_group(self.epoch, np.array(chosen[:per_step]))
        self.composed[self.count] = s.group_members(self.epoch, groups)[0]
        self.count += 1

    def batch(self, index: int) -> np.ndarray:
        """This rank's share of global batch ``index`` (composed in order; a few kept behind)."""
        while self.count <= index:
            self.compose_next()
        if index not in self.composed:
            raise IndexError(f"mining batch {index} was composed and released; read the batches in order")
        for old in [i for i in self.composed if i < index - _KEEP_BEHIND]:
            del self.composed[old]
        s = self.sampler
        batch = self.composed[index].reshape(s.world_size, s.groups_per_batch * s.samples_per_class)
        return batch[s.rank]


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

    def batches_from(self, epoch: int, start: int = 0) -> LazyRows:
        """This rank's batches of ``epoch`` from batch ``start`` on, composed in order as they are read."""
        return LazyRows(len(self), _EpochComposer(self, epoch).batch, start)

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        for b, batch in enumerate(self.batches_from(self.epoch, start), start=start):
            self._position = b + 1
            yield batch.tolist()
