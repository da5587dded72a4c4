"""Identity-grouped batch sampler for Prototype Memory training.

Every epoch (deterministic for ``(seed, epoch)``, identical on all ranks):

1. the images of each identity are shuffled and cut into groups of ``K = samples_per_class``;
2. **short groups are filled by repetition**: an identity with ``n`` images yields ``ceil(n/K)``
   groups, and its last group is completed with images of the same identity taken again in the
   same shuffled order from its first image on (an identity with 1 image and K=2 gives the group
   ``[a, a]``). Every image therefore appears at least once per epoch; filled-in images twice;
3. the groups are shuffled;
4. global batch ``b`` holds ``world_size * G`` consecutive groups (``G = batch_size // K``);
   rank ``r`` takes groups ``r*G .. (r+1)*G-1`` of it, so every rank's batch is made of whole
   groups, ranks are disjoint and the batch size is constant;
5. the tail with fewer groups than a global batch is dropped (``drop_last=True``; the group
   order changes each epoch so different images are dropped) or completed with groups from the
   start of the epoch's order (``drop_last=False``).

``samples_per_class=1`` is plain shuffling of all images. ``state_dict()`` records the position
(batches already consumed) inside the epoch; after ``load_state_dict`` the next iteration yields
exactly the remaining batches of that epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

__all__ = ["GroupedBatchSampler", "epoch_groups"]


def epoch_groups(labels: np.ndarray, samples_per_class: int, seed: int, epoch: int) -> np.ndarray:
    """Shuffled (num_groups, K) array of positions into ``labels`` for one epoch (see module doc)."""
    labels = np.asarray(labels)
    k = int(samples_per_class)
    rng = np.random.default_rng([int(seed), int(epoch)])
    n = len(labels)
    shuffled = rng.permutation(n)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    sorted_labels = labels[by_label]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    counts = np.diff(np.r_[starts, n])
    slots = (-(-counts // k)) * k
    slot_class = np.repeat(np.arange(len(counts)), slots)
    slot_in_class = np.arange(int(slots.sum())) - np.repeat(np.cumsum(slots) - slots, slots)
    positions = by_label[starts[slot_class] + slot_in_class % counts[slot_class]]
    groups = positions.reshape(-1, k)
    return groups[rng.permutation(len(groups))]


class GroupedBatchSampler:
    """Batches (lists of positions into ``labels``) of whole identity groups for one rank.

    ``batch_size`` is per rank and must be a multiple of ``samples_per_class``.
    """

    def __init__(
        self,
        labels: np.ndarray,
        batch_size: int,
        samples_per_class: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ):
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-D array")
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size <= 0 or batch_size % samples_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of samples_per_class ({samples_per_class})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.labels = labels
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.groups_per_batch = self.batch_size // self.samples_per_class
        _, counts = np.unique(labels, return_counts=True)
        self.num_groups = int((-(-counts // self.samples_per_class)).sum())
        per_step = self.groups_per_batch * self.world_size
        self._len = self.num_groups // per_step if self.drop_last else -(-self.num_groups // per_step)
        if self._len == 0:
            raise ValueError(
                f"{self.num_groups} identity groups cannot fill one global batch of {per_step} groups "
                f"(batch_size {self.batch_size} x world_size {self.world_size})"
            )
        self.epoch = 0
        self._position = 0
        self._resume_from: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffling depends on it) and restart at its first batch."""
        self.epoch = int(epoch)
        self._position = 0
        self._resume_from = None

    def __len__(self) -> int:
        return self._len

    def epoch_batches(self, epoch: int | None = None) -> np.ndarray:
        """All batches of this rank for ``epoch`` (default: current) as a (len, batch_size) array."""
        epoch = self.epoch if epoch is None else epoch
        groups = epoch_groups(self.labels, self.samples_per_class, self.seed, epoch)
        per_step = self.groups_per_batch * self.world_size
        needed = self._len * per_step
        if needed > len(groups):
            groups = np.concatenate([groups, groups[: needed - len(groups)]])
        groups = groups[:needed].reshape(self._len, self.world_size, self.groups_per_batch, self.samples_per_class)
        return groups[:, self.rank].reshape(self._len, self.batch_size)

    def batches_from(self, epoch: int, start: int = 0):
        """This rank's batches of ``epoch`` from batch ``start`` on (what a loader iterates)."""
        return self.epoch_batches(epoch)[start:]

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._position = start
        batches = self.epoch_batches()
        for b in range(start, self._len):
            self._position = b + 1
            yield batches[b].tolist()

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed"}``: ``position`` = batches of the epoch already handed out."""
        return {"epoch": self.epoch, "position": self._position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume: the next iteration yields the batches of ``state["epoch"]`` after ``position``."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}, this sampler uses {self.seed}")
        position = int(state["position"])
        if not 0 <= position <= self._len:
            raise ValueError(f"sampler position {position} is outside 0..{self._len}")
        self.epoch = int(state["epoch"])
        self._position = position
        self._resume_from = position
