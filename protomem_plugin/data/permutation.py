"""Keyed permutations of ``[0, n)`` computed one element at a time (no table of size ``n``).

A balanced Feistel network on ``2h`` bits (``4**h >= n``, so the domain is at most 4x ``n``) with a
splitmix64 round function is a bijection of ``[0, 4**h)``; *cycle walking* (apply it again while the
value lies outside ``[0, n)``) restricts it to a bijection of ``[0, n)``. Every function here is
vectorised over numpy arrays, and ``n`` and ``key`` may differ per element, so one call permutes the
members of many identities of different sizes at once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mix64", "derive_key", "permute", "unpermute"]

_ROUNDS = 6
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_wrapping = np.errstate(over="ignore")  # uint64 arithmetic wraps by design


@_wrapping
def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a 64-bit bijective mix (uint64 in, uint64 out, wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@_wrapping
def derive_key(*parts) -> np.ndarray:
    """A 64-bit key from integers or integer arrays (broadcast): a different key for every tuple."""
    key = np.zeros((), dtype=np.uint64)
    for part in parts:
        key = mix64((key + _GOLDEN) ^ np.asarray(part).astype(np.uint64))
    return key


def _half_bits(n: np.ndarray) -> np.ndarray:
    """Smallest ``h >= 1`` with ``4**h >= n`` (per element)."""
    bits = np.ceil(np.log2(np.maximum(n, 2).astype(np.float64))).astype(np.uint64)
    # float log2 may land one below for n just above a power of two: correct it exactly
    bits += (np.uint64(1) << bits) < n.astype(np.uint64)
    return np.maximum((bits + np.uint64(1)) >> np.uint64(1), np.uint64(1))


@_wrapping
def _rounds(x: np.ndarray, half: np.ndarray, key: np.ndarray, inverse: bool) -> np.ndarray:
    mask = (np.uint64(1) << half) - np.uint64(1)
    left, right = x >> half, x & mask
    order = range(_ROUNDS - 1, -1, -1) if inverse else range(_ROUNDS)
    for r in order:
        salt = key + np.uint64(r) * _GOLDEN
        if inverse:
            left, right = right ^ (mix64(left ^ salt) & mask), left
        else:
            left, right = right, left ^ (mix64(right ^ salt) & mask)
    return (left << half) | right


def _walk(index, n, key, inverse: bool) -> np.ndarray:
    index, n, key = np.broadcast_arrays(np.asarray(index, dtype=np.uint64), np.asarray(n, dtype=np.uint64),
                                        np.asarray(key, dtype=np.uint64))
    shape = index.shape
    index, n, key = index.ravel(), n.ravel(), key.ravel()
    if np.any(index >= n):
        raise ValueError("permute: an index is outside [0, n)")
    half = _half_bits(n)
    out = _rounds(index, half, key, inverse)
    todo = np.flatnonzero(out >= n)
    while len(todo):  # cycle walking: expected < 4 passes since the domain is < 4n
        out[todo] = _rounds(out[todo], half[todo], key[todo], inverse)
        todo = todo[out[todo] >= n[todo]]
    return out.astype(np.int64).reshape(shape)


def permute(index, n, key) -> np.ndarray:
    """The image of ``index`` under the keyed permutation of ``[0, n)`` (int64, broadcast shape)."""
    return _walk(index, n, key, inverse=False)


def unpermute(value, n, key) -> np.ndarray:
    """The inverse of :func:`permute`: the index whose image is ``value``."""
    return _walk(value, n, key, inverse=True)
