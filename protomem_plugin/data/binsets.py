"""Validation ``.bin`` sets of arcface_torch (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A ``.bin`` is a pickled ``(bins, issame_list)``: ``2N`` encoded images (bytes, or uint8 numpy
arrays holding the encoded bytes) and ``N`` booleans, pair ``i`` being images ``2i`` and
``2i+1``. Files written by Python 2 need ``encoding="bytes"``, which is what is tried first.

Unpickling is restricted: only list/tuple/bytes/bool/int values and the few numpy globals needed
to rebuild uint8 arrays and numpy booleans are allowed. Any other global (a class, a function
such as ``os.system``) raises :class:`UnsafePickleError` naming the file and the global, before
anything is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Sequence

import cv2
import numpy as np

__all__ = ["UnsafePickleError", "load_bin", "load_bin_encoded", "write_bin"]


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """The pickle refers to a global outside the allow-list of a .bin set."""


_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
    ("builtins", "bytearray"),
    ("__builtin__", "bytearray"),
}


class _BinUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self._path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"{self._path}: refusing to unpickle global {module}.{name} (not part of a .bin set)")


def _as_bytes(item, path: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, str):  # a Python 2 str read with encoding="latin1"
        return item.encode("latin1")
    raise ValueError(f"{path}: image {index} is a {type(item).__name__}, expected encoded bytes or a uint8 array")


def _unpickle(path: str, data: bytes, encoding: str):
    return _BinUnpickler(io.BytesIO(data), path, encoding).load()


def load_bin_encoded(path: str) -> tuple[list[bytes], np.ndarray]:
    """The encoded images (2N bytes objects) and ``issame`` (bool, N) of a ``.bin`` set."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        obj = _unpickle(path, data, "bytes")
    except UnsafePickleError:
        raise
    except Exception:
        try:
            obj = _unpickle(path, data, "latin1")
        except UnsafePickleError:
            raise
        except Exception as err:
            raise ValueError(f"{path}: not a readable .bin pickle ({err})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise ValueError(f"{path}: bins must be a list, got {type(bins).__name__}")
    if isinstance(issame, np.ndarray):
        issame = issame.tolist()
    if not isinstance(issame, (list, tuple)):
        raise ValueError(f"{path}: issame_list must be a list, got {type(issame).__name__}")
    flags = []
    for i, value in enumerate(issame):
        if not isinstance(value, (bool, int, np.bool_, np.integer)) or int(value) not in (0, 1):
            raise ValueError(f"{path}: issame_list[{i}] = {value!r} is not a boolean")
        flags.append(bool(value))
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{path}: {len(bins)} images for {len(flags)} pairs (expected {2 * len(flags)})")
    if not flags:
        raise ValueError(f"{path}: the set holds no pairs (issame_list is empty)")
    return [_as_bytes(item, path, i) for i, item in enumerate(bins)], np.asarray(flags, dtype=bool)


def load_bin(path: str, image_size: tuple[int, int] = (112, 112)) -> tuple[np.ndarray, np.ndarray]:
    """Decoded images uint8 RGB (2N, H, W, 3), resized to ``image_size`` (H, W) if needed, and issame (N,)."""
    encoded, issame = load_bin_encoded(path)
    height, width = image_size
    images = np.empty((len(encoded), height, width, 3), dtype=np.uint8)
    for i, data in enumerate(encoded):
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
        if image is None:
            raise ValueError(f"{path}: image {i} ({len(data)} bytes) is not a decodable image")
        if image.shape[:2] != (height, width):
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        images[i] = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    return images, issame


def write_bin(path: str, encoded_images: list[bytes], issame: Sequence[bool]) -> None:
    """Write a ``.bin`` set: ``2N`` encoded images and ``N`` pair flags."""
    issame = [bool(v) for v in issame]
    if len(encoded_images) != 2 * len(issame):
        raise ValueError(f"{len(encoded_images)} images for {len(issame)} pairs (expected {2 * len(issame)})")
    bins = [bytes(b) for b in encoded_images]
    with open(path, "wb") as f:
        pickle.dump((bins, issame), f, protocol=4)
