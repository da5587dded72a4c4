"""A sidecar cache of the labels read from every image header of a ``.rec``.

Datasets without identity records (headerless), and header datasets too large for exact float32
key ranges, get their labels by reading every image header: one read per image, slow on network
storage. The labels are then saved beside the ``.rec`` as ``<name>.labels.npy`` with
``<name>.labels.json`` (sizes and modification times of the ``.rec`` and ``.idx``, image count and
key range) and reused while those match. Writes are atomic; a folder that cannot be written is
reported once and the labels are used without caching.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any, Callable

import numpy as np

__all__ = ["cached_labels", "label_cache_paths"]


def label_cache_paths(root_dir: str, rec_name: str) -> tuple[str, str]:
    """(labels .npy, metadata .json) beside ``<root_dir>/<rec_name>.rec``."""
    stem = os.path.join(root_dir, f"{rec_name}.labels")
    return stem + ".npy", stem + ".json"


def _stamp(rec: Any) -> dict:
    keys = rec.image_keys
    stamp = {"images": int(len(keys)), "first_key": int(keys[0]), "last_key": int(keys[-1])}
    for name, path in (("rec", rec.record_io.rec_path), ("idx", rec.record_io.idx_path)):
        stat = os.stat(path) if os.path.isfile(path) else None
        stamp[f"{name}_size"] = stat.st_size if stat else None
        stamp[f"{name}_mtime_ns"] = stat.st_mtime_ns if stat else None
    return stamp


def _load(npy: str, meta: str, stamp: dict) -> np.ndarray | None:
    try:
        with open(meta, encoding="utf-8") as f:
            if json.load(f) != stamp:
                return None
        labels = np.load(npy, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return labels.astype(np.int64, copy=False) if labels.shape == (stamp["images"],) else None


def _save(npy: str, meta: str, labels: np.ndarray, stamp: dict) -> None:
    tmp_npy, tmp_meta = npy + f".tmp{os.getpid()}.npy", meta + f".tmp{os.getpid()}"
    small = labels.astype(np.int32) if labels.max(initial=0) < 2**31 else labels
    try:
        np.save(tmp_npy, small)
        with open(tmp_meta, "w", encoding="utf-8") as f:
            json.dump(stamp, f)
        os.replace(tmp_npy, npy)
        os.replace(tmp_meta, meta)  # the metadata last: a cache without matching metadata is ignored
    except OSError as err:
        for path in (tmp_npy, tmp_meta):
            if os.path.exists(path):
                os.remove(path)
        warnings.warn(f"cannot cache labels beside {npy} ({err}); they will be read again next time", stacklevel=3)


def cached_labels(rec: Any, rec_name: str, read: Callable[[], np.ndarray]) -> np.ndarray:
    """The labels of ``rec`` (an :class:`InsightFaceRec` being opened) from the cache if it matches
    the files, else from ``read()``, then cached."""
    npy, meta = label_cache_paths(rec.root_dir, rec_name)
    stamp = _stamp(rec)
    labels = _load(npy, meta, stamp)
    if labels is None:
        labels = read()
        _save(npy, meta, labels, stamp)
    return labels
