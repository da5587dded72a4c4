"""Packing images into an InsightFace-layout dataset (train.rec, train.idx, property).

Sources: an image folder with one sub-folder per identity (identities numbered 0..C-1 in sorted
sub-folder order), or an ``im2rec``-style list file with lines ``index<TAB>label<TAB>path``
(paths relative to a root folder). Image bytes are stored as they are (no re-encoding) after
checking that OpenCV can decode them. Existing datasets are never overwritten: files are
written under temporary names and renamed at the end.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from .recordio import IRHeader, RecordIOError, RecordIOWriter, decode_image, pack_record, write_property

__all__ = [
    "DATASET_FILES",
    "IMAGE_EXTENSIONS",
    "write_insightface_rec",
    "list_image_folder",
    "read_list_file",
    "pack_images",
]

DATASET_FILES = ("train.rec", "train.idx", "property")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _refuse_existing(out_dir: str) -> None:
    existing = [name for name in DATASET_FILES if os.path.exists(os.path.join(out_dir, name))]
    if existing:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; refusing to overwrite it")


def write_insightface_rec(
    out_dir: str,
    samples: Iterable[tuple[int, bytes]],
    *,
    num_classes: int,
    image_size: tuple[int, int],
    total: int | None = None,
    progress: bool = True,
    desc: str = "packing",
) -> int:
    """Write ``(label, encoded image)`` samples, grouped by non-decreasing label, as an InsightFace dataset.

    Images get keys 1..N, identity records follow (one per class 0..num_classes-1, possibly an
    empty key range), key 0 is the header record. Returns N. Raises FileExistsError if any of
    train.rec/train.idx/property exists in ``out_dir``.
    """
    os.makedirs(out_dir, exist_ok=True)
    _refuse_existing(out_dir)
    tmp = {name: os.path.join(out_dir, f".{name}.partial") for name in DATASET_FILES}
    starts = np.zeros(num_classes + 1, dtype=np.int64)
    try:
        with RecordIOWriter(tmp["train.rec"], tmp["train.idx"]) as writer:
            # Placeholder header; rewritten with the same length once the key ranges are known.
            writer.write(0, pack_record(IRHeader(2, np.zeros(2, np.float32), 0, 0), b""))
            key = 1
            previous = -1
            counts = np.zeros(num_classes, dtype=np.int64)
            for label, data in tqdm(samples, total=total, desc=desc, disable=not progress, unit="img"):
                label = int(label)
                if not 0 <= label < num_classes:
                    raise ValueError(f"label {label} of image {key} is outside 0..{num_classes - 1}")
                if label < previous:
                    raise ValueError(f"samples must be grouped by non-decreasing label (got {label} after {previous})")
                previous = label
                writer.write(key, pack_record(IRHeader(0, float(label), key, 0), data))
                counts[label] += 1
                key += 1
            num_images = key - 1
            starts[1:] = np.cumsum(counts)
            starts += 1
            first_identity_key = num_images + 1
            for c in range(num_classes):
                rng = np.array([starts[c], starts[c + 1]], dtype=np.float32)
                writer.write(first_identity_key + c, pack_record(IRHeader(2, rng, 0, 0), b""))
            end_key = first_identity_key + num_classes
            header_label = np.array([first_identity_key, end_key], dtype=np.float32)
            if int(header_label[1]) != end_key:
                raise ValueError(f"{end_key} keys cannot be stored exactly in a float32 header")
            writer.overwrite(0, pack_record(IRHeader(2, header_label, 0, 0), b""))
        write_property(tmp["property"], num_classes, image_size[0], image_size[1])
        _refuse_existing(out_dir)
        for name in DATASET_FILES:
            os.replace(tmp[name], os.path.join(out_dir, name))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    return num_images


def list_image_folder(image_dir: str) -> list[tuple[int, str]]:
    """``(label, path)`` of every image under ``image_dir/<identity>/``; labels follow sorted folder names."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    identities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    if not identities:
        raise ValueError(f"{image_dir} has no identity sub-folders")
    items = []
    for label, name in enumerate(identities):
        folder = os.path.join(image_dir, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        items.extend((label, os.path.join(folder, f)) for f in files)
    return items


def read_list_file(list_path: str, root: str | None = None) -> list[tuple[int, str]]:
    """Parse an im2rec list file (``index<TAB>label<TAB>path``) into ``(label, path)`` pairs.

    Relative paths are resolved against ``root`` (default: the list file's folder).
    """
    root = root if root is not None else os.path.dirname(os.path.abspath(list_path))
    items = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3:
                raise ValueError(f"{list_path}:{lineno}: expected 'index<TAB>label<TAB>path', got {line.strip()!r}")
            try:
                label_f = float(fields[1])
            except ValueError:
                raise ValueError(f"{list_path}:{lineno}: label {fields[1]!r} is not a number") from None
            if label_f != int(label_f) or label_f < 0:
                raise ValueError(f"{list_path}:{lineno}: label {fields[1]!r} is not a non-negative integer")
            path = fields[-1]
            items.append((int(label_f), path if os.path.isabs(path) else os.path.join(root, path)))
    if not items:
        raise ValueError(f"{list_path} lists no images")
    return items


def _encoded_samples(items: Sequence[tuple[int, str]], size_check: Callable[[np.ndarray, str], None]):
    for label, path in items:
        with open(path, "rb") as f:
            data = f.read()
        try:
            image = decode_image(data, path)
        except RecordIOError:
            raise ValueError(f"{path} is not a decodable image") from None
        size_check(image, path)
        yield label, data


def pack_images(
    source: str, out_dir: str, *, root: str | None = None, progress: bool = True
) -> int:
    """Pack an identity-folder tree or an im2rec list file into ``out_dir`` (InsightFace layout).

    All images must have the same size (stored in ``property``). Returns the number of images.
    """
    items = read_list_file(source, root) if os.path.isfile(source) else list_image_folder(source)
    items = sorted(items, key=lambda item: item[0])
    first = decode_image(open(items[0][1], "rb").read(), items[0][1])
    height, width = first.shape[:2]

    def size_check(image: np.ndarray, path: str) -> None:
        if image.shape[:2] != (height, width):
            raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected {width}x{height} like the first image")

    num_classes = max(label for label, _ in items) + 1
    return write_insightface_rec(
        out_dir,
        _encoded_samples(items, size_check),
        num_classes=num_classes,
        image_size=(height, width),
        total=len(items),
        progress=progress,
    )
