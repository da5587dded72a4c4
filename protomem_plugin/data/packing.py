"""Packing images into an InsightFace-layout dataset (train.rec, train.idx, property).

Sources: an image folder with one sub-folder per identity (identities numbered 0..C-1 in sorted
sub-folder order), or an ``im2rec``-style list file with lines ``index<TAB>label<TAB>path``
(paths relative to a root folder). Image bytes are stored as they are (no re-encoding) after
checking that OpenCV can decode them. Existing datasets are never overwritten.

Atomic dataset writes (:func:`staged_dataset_dir`, also used by the synthetic dataset): a dataset
is built in a temporary sibling folder ``<out>.tmp-<host>-<pid>`` and only when complete swapped
into ``<out>`` (the old folder renamed aside, the new one renamed in, other files of the old folder
moved over, then the old folder deleted), so a failed or interrupted run leaves ``<out>`` as it
was. Temporary folders left by killed runs on this host are removed by the next run. Where
``<out>`` cannot be renamed (a mount point, a read-only parent) the stage is a hidden folder inside
it and the finished files are renamed in one by one.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from .recordio import IRHeader, RecordIOError, RecordIOWriter, decode_image, pack_record, write_property

__all__ = [
    "DATASET_FILES",
    "IMAGE_EXTENSIONS",
    "write_insightface_rec",
    "header_label",
    "list_image_folder",
    "read_list_file",
    "pack_images",
    "staged_dataset_dir",
]

DATASET_FILES = ("train.rec", "train.idx", "property")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")


def _host_tag() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _stage_names(target: str) -> tuple[str, str]:
    """(folder, name prefix) of this host's stage folders for the dataset folder ``target``."""
    if os.path.isdir(target) and (os.path.ismount(target) or not os.access(os.path.dirname(target), os.W_OK)):
        return target, f".stage-{_host_tag()}-"  # the folder itself cannot be renamed: stage inside it
    parent, name = os.path.split(target)
    return parent, f"{name}.tmp-{_host_tag()}-"


def _remove_stale_stages(folder: str, prefix: str) -> None:
    """Delete stage folders ``<prefix><pid>`` of this host whose process is gone."""
    for entry in os.listdir(folder):
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def _replace_entries(stage: str, target: str, replaced: Sequence[str]) -> None:
    """Move every entry of ``stage`` into ``target`` (one rename each), then delete the entries of
    ``target`` named in ``replaced`` that the new dataset does not have."""
    new = os.listdir(stage)
    for entry in new:
        dest = os.path.join(target, entry)
        if os.path.isdir(dest) and not os.path.islink(dest):
            aside = os.path.join(target, f".{entry}.old-{_host_tag()}-{os.getpid()}")
            os.rename(dest, aside)
            os.rename(os.path.join(stage, entry), dest)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(os.path.join(stage, entry), dest)
    for entry in set(replaced) - set(new):
        path = os.path.join(target, entry)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _swap_into_place(stage: str, target: str, replaced: Sequence[str]) -> None:
    """Move the finished ``stage`` folder to ``target``; entries of an existing ``target`` named in
    ``replaced`` are deleted, its other entries are kept."""
    if os.path.dirname(stage) == target:
        _replace_entries(stage, target, replaced)
        return
    if not os.path.lexists(target):
        os.rename(stage, target)
        return
    old = f"{target}.old-{_host_tag()}-{os.getpid()}"
    os.rename(target, old)
    try:
        os.rename(stage, target)
    except BaseException:
        os.rename(old, target)
        raise
    for entry in os.listdir(old):
        if entry not in replaced and not os.path.lexists(os.path.join(target, entry)):
            os.rename(os.path.join(old, entry), os.path.join(target, entry))
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dataset_dir(out_dir: str, replaced: Sequence[str] = ()) -> Iterator[str]:
    """Yield an empty temporary folder to build a dataset in; on success its content replaces the
    dataset in ``out_dir`` (see the module docstring), on any error it is deleted and ``out_dir``
    is left untouched. Entries of an existing ``out_dir`` named in ``replaced`` are replaced (the
    dataset's own files), all others are kept.

    The stage is the sibling ``<out>.tmp-<host>-<pid>``, swapped in as a whole; where ``out_dir``
    is a mount point or its parent is not writable, it is ``<out>/.stage-<host>-<pid>`` and its
    entries are renamed into ``out_dir`` one by one.
    """
    target = os.path.realpath(out_dir)  # a symlinked dataset folder: replace the folder it points to
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    folder, prefix = _stage_names(target)
    _remove_stale_stages(folder, prefix)
    stage = os.path.join(folder, f"{prefix}{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    os.mkdir(stage)
    try:
        yield stage
        _swap_into_place(stage, target, replaced)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _refuse_existing(out_dir: str) -> None:
    existing = [name for name in DATASET_FILES if os.path.exists(os.path.join(out_dir, name))]
    if existing:
        raise FileExistsError(f"{out_dir} already holds {', '.join(existing)}; refusing to overwrite it")


def header_label(first_identity_key: int, end_key: int, where: str = "") -> np.ndarray:
    """The header record's float32 label ``[first identity-record key, end key]``.

    The format stores these keys as float32, which rounds integers beyond 2**24 (datasets of more
    than ~16.7M images, e.g. WebFace42M). They are written rounded, as InsightFace's own packer
    writes them, with a warning: protomem's reader and DALI's reader find the exact keys, while
    arcface_torch's ``MXFaceDataset`` takes the rounded first key as the end of the image keys.
    """
    label = np.array([first_identity_key, end_key], dtype=np.float32)
    if int(label[0]) != first_identity_key or int(label[1]) != end_key:
        warnings.warn(
            f"{where or 'dataset'}: the header keys {first_identity_key} and {end_key} are beyond float32's "
            f"exact integers (2**24) and are stored rounded ({int(label[0])}, {int(label[1])}); protomem and "
            "DALI read the exact keys, arcface_torch's MXFaceDataset reads the rounded ones", stacklevel=2)
    return label


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
            writer.overwrite(0, pack_record(IRHeader(2, header_label(first_identity_key, end_key, out_dir), 0, 0), b""))
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
    """``(label, path)`` of every image under ``image_dir/<identity>/``; labels follow sorted folder names.

    Raises ValueError naming the folders if ``image_dir`` has no identity sub-folders or any
    identity folder holds no image.
    """
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder not found: {image_dir}")
    identities = sorted(d for d in os.listdir(image_dir) if os.path.isdir(os.path.join(image_dir, d)))
    if not identities:
        raise ValueError(f"{image_dir} has no identity sub-folders (expected {image_dir}/<identity>/<image>.jpg)")
    items, empty = [], []
    for label, name in enumerate(identities):
        folder = os.path.join(image_dir, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not files:
            empty.append(folder)
        items.extend((label, os.path.join(folder, f)) for f in files)
    if empty:
        more = f" and {len(empty) - 3} more" if len(empty) > 3 else ""
        raise ValueError(
            f"{image_dir}: {len(empty)} of {len(identities)} identity folders hold no image "
            f"({'/'.join(IMAGE_EXTENSIONS)}): {', '.join(empty[:3])}{more}"
        )
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
    The source is checked before anything is written; the dataset is built in a temporary folder
    and swapped into ``out_dir`` when complete (see :func:`staged_dataset_dir`). Raises
    FileExistsError if ``out_dir`` already holds a dataset.
    """
    if not os.path.exists(source):
        raise FileNotFoundError(f"source not found: {source} (expected an identity-folder tree or an im2rec list file)")
    items = read_list_file(source, root) if os.path.isfile(source) else list_image_folder(source)
    missing = [path for _, path in items if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{source}: {len(missing)} listed image(s) not found, the first: {missing[0]}")
    _refuse_existing(out_dir)
    items = sorted(items, key=lambda item: item[0])
    shape: list[tuple[int, int]] = []

    def size_check(image: np.ndarray, path: str) -> None:
        if not shape:
            shape.append(image.shape[:2])
        elif image.shape[:2] != shape[0]:
            height, width = shape[0]
            raise ValueError(f"{path} is {image.shape[1]}x{image.shape[0]}, expected {width}x{height} like the first image")

    samples = _encoded_samples(items, size_check)
    first = next(samples)  # decodes the first image: its size goes to ``property``
    num_classes = max(label for label, _ in items) + 1
    with staged_dataset_dir(out_dir, replaced=DATASET_FILES) as stage:
        count = write_insightface_rec(
            stage,
            itertools.chain([first], samples),
            num_classes=num_classes,
            image_size=shape[0],
            total=len(items),
            progress=progress,
        )
        _refuse_existing(out_dir)
    return count
