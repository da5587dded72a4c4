"""Where each identity's images are, in memory that grows with identities only (compact dtypes).

An :class:`IdentityLayout` holds the number of images of every identity in the smallest unsigned
dtype that fits, and block prefix sums (one int64 per ``BLOCK`` identities) from which any
identity's first image and any group's identity are found by a binary search plus a short scan.
Images of identity ``c`` are either contiguous positions in identity order (the InsightFace header
layout, or sorted labels: nothing per image is kept) or listed by ``order`` (positions sorted by
identity; kept for unsorted label arrays only).

At 1e8 identities of at most 65,535 images each this is 200 MB (uint16 counts) plus 6 MB of prefix
sums, whatever the number of images.
"""

from __future__ import annotations

import numpy as np

__all__ = ["IdentityLayout", "compact_unsigned"]

BLOCK = 256  # identities per prefix-sum entry
_CHUNK = 1 << 20  # identities processed at a time when summing (bounds the int64 temporaries)
_LOCATE_CHUNK = 4096  # lookups located at a time (bounds the (lookups, BLOCK) scan matrix)


def compact_unsigned(values: np.ndarray) -> np.ndarray:
    """``values`` (non-negative integers) in the smallest unsigned dtype that holds them."""
    values = np.asarray(values)
    top = int(values.max()) if len(values) else 0
    if values.min(initial=0) < 0:
        raise ValueError("compact_unsigned: negative value")
    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64):
        if top <= np.iinfo(dtype).max:
            return values.astype(dtype, copy=False)
    raise ValueError(f"value {top} does not fit in 64 bits")


class IdentityLayout:
    """Images per identity and where they are; see the module docstring."""

    def __init__(self, counts: np.ndarray, order: np.ndarray | None = None, identity_labels: np.ndarray | None = None):
        counts = np.asarray(counts)
        if counts.ndim != 1 or len(counts) == 0:
            raise ValueError("counts must be a non-empty 1-D array of images per identity")
        padded = -(-len(counts) // BLOCK) * BLOCK
        self.counts = np.zeros(padded, dtype=compact_unsigned(counts).dtype)
        self.counts[: len(counts)] = counts
        self.num_identities = len(counts)
        self.image_prefix = self._block_prefix(lambda c: c.astype(np.int64))
        self.num_images = int(self.image_prefix[-1])
        if self.num_images == 0:
            raise ValueError("the identities hold no images")
        if order is not None and len(order) != self.num_images:
            raise ValueError(f"order lists {len(order)} positions for {self.num_images} images")
        self.order = order
        self.identity_labels = identity_labels
        self._group_prefix: dict[int, np.ndarray] = {}

    @classmethod
    def from_labels(cls, labels: np.ndarray) -> "IdentityLayout":
        """Layout of a per-image label array; identities are the distinct labels in increasing order."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-D array")
        if np.all(labels[1:] >= labels[:-1]):  # sorted: each identity's images are contiguous
            order = None
            distinct, counts = np.unique(labels, return_counts=True)
        else:
            order = np.argsort(labels, kind="stable")
            order = order.astype(np.int32) if len(labels) < 2**31 else order
            distinct, counts = np.unique(labels[order], return_counts=True)
        plain = distinct[0] == 0 and distinct[-1] == len(distinct) - 1
        return cls(counts, order, None if plain else distinct)

    @classmethod
    def from_counts(cls, counts: np.ndarray) -> "IdentityLayout":
        """Layout of identities whose images are contiguous in identity order (identity ``c`` = label ``c``)."""
        return cls(counts)

    def _block_prefix(self, per_identity) -> np.ndarray:
        """int64 prefix sums at every BLOCK-th identity of ``per_identity(counts_chunk)``."""
        sums = np.empty(len(self.counts) // BLOCK, dtype=np.int64)
        for lo in range(0, len(self.counts), _CHUNK):
            chunk = per_identity(self.counts[lo : lo + _CHUNK])
            sums[lo // BLOCK : lo // BLOCK + len(chunk) // BLOCK] = chunk.reshape(-1, BLOCK).sum(axis=1)
        return np.concatenate([[0], np.cumsum(sums)])

    def num_groups(self, k: int) -> int:
        """Groups of ``k`` when each identity yields ``ceil(images / k)``."""
        return int(self.group_prefix(k)[-1])

    def group_prefix(self, k: int) -> np.ndarray:
        if k not in self._group_prefix:
            self._group_prefix[k] = self._block_prefix(lambda c: -(-c.astype(np.int64) // k))
        return self._group_prefix[k]

    def locate_groups(self, groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """For group numbers ``groups`` (0 .. num_groups(k)-1, in identity order): the identity, the
        group's number within it, the identity's image count and the slot of its first image."""
        groups = np.asarray(groups, dtype=np.int64).reshape(-1)
        out = [np.empty(len(groups), dtype=np.int64) for _ in range(4)]
        prefix, columns = self.group_prefix(k), np.arange(BLOCK)
        for lo in range(0, len(groups), _LOCATE_CHUNK):
            j = groups[lo : lo + _LOCATE_CHUNK]
            block = np.searchsorted(prefix, j, side="right") - 1
            counts = self.counts[block[:, None] * BLOCK + columns].astype(np.int64)
            group_cum = np.cumsum(-(-counts // k), axis=1)
            rest = j - prefix[block]
            within = (group_cum <= rest[:, None]).sum(axis=1)
            rows = np.arange(len(j))
            n = counts[rows, within]
            out[0][lo : lo + len(j)] = block * BLOCK + within
            out[1][lo : lo + len(j)] = rest - (group_cum[rows, within] - (-(-n // k)))
            out[2][lo : lo + len(j)] = n
            out[3][lo : lo + len(j)] = self.image_prefix[block] + np.cumsum(counts, axis=1)[rows, within] - n
        return out[0], out[1], out[2], out[3]

    def identity_groups(self, identity: int, k: int) -> tuple[int, int]:
        """(first group number, number of groups) of one identity for groups of ``k``."""
        block = identity // BLOCK
        groups = -(-self.counts[block * BLOCK : identity + 1].astype(np.int64) // k)
        return int(self.group_prefix(k)[block] + groups[:-1].sum()), int(groups[-1])

    def identity_of_label(self, label: int) -> int | None:
        """The identity number of a label value, None when no image has it."""
        if self.identity_labels is None:
            return int(label) if 0 <= label < self.num_identities and self.counts[label] else None
        i = int(np.searchsorted(self.identity_labels, label))
        return i if i < self.num_identities and self.identity_labels[i] == label else None

    def positions(self, slots: np.ndarray) -> np.ndarray:
        """Dataset positions of image slots (slot = identity's first slot + offset)."""
        return slots if self.order is None else self.order[slots].astype(np.int64)

    def label_of(self, identities: np.ndarray) -> np.ndarray:
        """The label value of identity numbers."""
        return identities if self.identity_labels is None else self.identity_labels[identities]

    @property
    def nbytes(self) -> int:
        """Bytes held (counts, prefix sums, order and labels when kept)."""
        held = [self.counts, self.image_prefix, *self._group_prefix.values()]
        held += [a for a in (self.order, self.identity_labels) if a is not None]
        return int(sum(a.nbytes for a in held))
