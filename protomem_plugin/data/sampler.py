"""Identity-grouped batch sampler for Prototype Memory training, computed batch by batch.

Every epoch (deterministic for ``(seed, epoch)``, identical on all ranks):

1. the images of each identity are shuffled (a keyed permutation per identity and epoch) and cut
   into groups of ``K = samples_per_class``;
2. **short groups are filled by repetition**: an identity with ``n`` images yields ``ceil(n/K)``
   groups, and its last group is completed with images of the same identity taken again in the
   same shuffled order from its first image on (an identity with 1 image and K=2 gives the group
   ``[a, a]``). Every image therefore appears at least once per epoch; filled-in images twice;
3. the groups are shuffled (a keyed permutation of all groups of the epoch);
4. global batch ``b`` holds ``world_size * G`` consecutive groups (``G = batch_size // K``);
   rank ``r`` takes groups ``r*G .. (r+1)*G-1`` of it, so every rank's batch is made of whole
   groups, ranks are disjoint, the batch size is constant and the global order does not depend
   on the world size;
5. the tail with fewer groups than a global batch is dropped (``drop_last=True``; the group
   order changes each epoch so different images are dropped) or completed with groups from the
   start of the epoch's order (``drop_last=False``).

``samples_per_class=1`` is plain shuffling of all images. Nothing per image or per epoch is built:
both permutations are Feistel networks evaluated on demand (:mod:`.permutation`) and identities are
found in an :class:`~.identity_layout.IdentityLayout` (compact counts and block prefix sums), so a
sampler over 1e8 identities holds a few hundred MB and its first batch is ready at once; each rank
computes only its own batches. ``state_dict()`` records the position (batches already consumed)
inside the epoch; after ``load_state_dict`` the next iteration yields exactly the remaining batches
of that epoch.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .identity_layout import IdentityLayout
from .lazy_rows import LazyRows
from .permutation import derive_key, permute

__all__ = ["GroupedBatchSampler"]


class GroupedBatchSampler:
    """Batches (positions into the dataset) of whole identity groups for one rank.

    ``labels`` is a per-image label array or an :class:`IdentityLayout` (e.g.
    ``IdentityLayout.from_counts(images_per_identity)`` for the InsightFace header layout, which
    needs no per-image array). ``batch_size`` is per rank and must be a multiple of ``samples_per_class``.
    """

    def __init__(
        self,
        labels: "np.ndarray | IdentityLayout",
        batch_size: int,
        samples_per_class: int = 2,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        drop_last: bool = True,
    ):
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {samples_per_class}")
        if batch_size <= 0 or batch_size % samples_per_class:
            raise ValueError(
                f"batch_size ({batch_size}) must be a positive multiple of samples_per_class ({samples_per_class})"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
        self.layout = labels if isinstance(labels, IdentityLayout) else IdentityLayout.from_labels(labels)
        self.batch_size = int(batch_size)
        self.samples_per_class = int(samples_per_class)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.groups_per_batch = self.batch_size // self.samples_per_class
        self.num_groups = self.layout.num_groups(self.samples_per_class)
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

    def epoch_key(self, epoch: int) -> np.ndarray:
        """The key of ``epoch``'s permutations (the same on every rank)."""
        return derive_key(self.seed, epoch)

    def epoch_group(self, epoch: int, slots: np.ndarray) -> np.ndarray:
        """Group numbers (identity order) at places ``slots`` of ``epoch``'s shuffled group order;
        places past the last group wrap to the start of the order (the ``drop_last=False`` tail)."""
        slots = np.asarray(slots, dtype=np.int64)
        return permute(slots % self.num_groups, self.num_groups, self.epoch_key(epoch))

    def group_members(self, epoch: int, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions (len(groups), K), identity numbers) of group numbers ``groups`` in ``epoch``."""
        k = self.samples_per_class
        identity, within, count, first = self.layout.locate_groups(groups, k)
        count = count[:, None]
        slots = (within[:, None] * k + np.arange(k)) % count  # the fill rule: cycle the shuffled order
        shuffled = permute(slots, count, derive_key(self.seed, epoch, identity)[:, None])
        return self.layout.positions(first[:, None] + shuffled), identity

    def batch(self, epoch: int, index: int) -> np.ndarray:
        """This rank's batch ``index`` of ``epoch`` (positions, length ``batch_size``)."""
        if not 0 <= index < self._len:
            raise IndexError(f"batch {index} is outside 0..{self._len - 1}")
        first = (index * self.world_size + self.rank) * self.groups_per_batch
        groups = self.epoch_group(epoch, np.arange(first, first + self.groups_per_batch))
        return self.group_members(epoch, groups)[0].reshape(-1)

    def batches_from(self, epoch: int, start: int = 0) -> LazyRows:
        """This rank's batches of ``epoch`` from batch ``start`` on, computed as they are read."""
        return LazyRows(self._len, lambda b: self.batch(epoch, b), start)

    def epoch_batches(self, epoch: int | None = None) -> np.ndarray:
        """All batches of this rank for ``epoch`` (default: current) as a (len, batch_size) array."""
        return self.batches_from(self.epoch if epoch is None else epoch).materialize()

    def __iter__(self) -> Iterator[list[int]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        self._position = start
        for b in range(start, self._len):
            self._position = b + 1
            yield self.batch(self.epoch, b).tolist()

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
