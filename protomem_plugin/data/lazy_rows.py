"""A read-only sequence whose rows are computed when asked for (an epoch of batches, per-image draws)."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

__all__ = ["LazyRows"]


class LazyRows(Sequence):
    """Rows ``start .. stop-1`` of ``row(i)``; slicing (step 1) gives another lazy view, never a copy."""

    def __init__(self, length: int, row: Callable[[int], np.ndarray], start: int = 0, stop: int | None = None):
        self._row, self._length = row, int(length)
        self.start = int(start)
        self.stop = self._length if stop is None else int(stop)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, index):
        if isinstance(index, slice):
            lo, hi, step = index.indices(len(self))
            if step != 1:
                raise ValueError("LazyRows slices take step 1")
            return LazyRows(self._length, self._row, self.start + lo, self.start + max(lo, hi))
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._row(self.start + index)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(self.start, self.stop):
            yield self._row(i)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> "LazyRows":
        """The same rows passed through ``fn`` (still lazy)."""
        row = self._row
        return LazyRows(self._length, lambda i: fn(row(i)), self.start, self.stop)

    def materialize(self) -> np.ndarray:
        """All rows stacked (for small epochs and tests)."""
        return np.stack(list(self)) if len(self) else np.zeros((0,), dtype=np.int64)
