"""Image-folder training sets (``root/<identity>/<image>``), the layout arcface_torch also accepts.

As with the ImageFolder convention arcface_torch relies on, the identities are the sorted names
of the sub-folders of ``root`` and an image's label is the position of its folder in that order;
images are the files with a known image extension, sorted by name inside each folder. The source
offers the part of :class:`~protomem_plugin.data.recordio.InsightFaceRec`'s interface the loaders
use (``image_keys``, ``labels``, ``num_classes``, ``image_size``, ``read_image_bytes``, ``where``),
so the DALI and PyTorch loaders read both layouts.
"""

from __future__ import annotations

import os

import numpy as np

from .recordio import RecordIOError, decode_image

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderSource", "open_train_source"]

#: File extensions read as images (lower case), those of the ImageFolder convention.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class ImageFolderSource:
    """The images under ``root/<identity>/``; the key of an image is its position in the listing."""

    def __init__(self, root_dir: str):
        self.root_dir = str(root_dir)
        self.rec_path = self.root_dir
        self.image_size = None  # unknown without decoding: loaders resize every image
        if not os.path.isdir(self.root_dir):
            raise RecordIOError(f"{self.root_dir}: not a folder")
        classes = sorted(e.name for e in os.scandir(self.root_dir) if e.is_dir())
        if not classes:
            raise RecordIOError(f"{self.root_dir}: no train.rec/train.idx and no identity sub-folders")
        paths: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            folder = os.path.join(self.root_dir, name)
            files = sorted(e.name for e in os.scandir(folder)
                           if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
            paths.extend(os.path.join(folder, f) for f in files)
            labels.extend([label] * len(files))
        if not paths:
            raise RecordIOError(f"{self.root_dir}: {len(classes)} identity folders but no image files "
                                f"({', '.join(IMAGE_EXTENSIONS)})")
        self.classes = classes
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)
        self.image_keys = np.arange(len(paths), dtype=np.int64)
        self.num_classes = len(classes)

    def __len__(self) -> int:
        return len(self.paths)

    def where(self, key: int) -> str:
        """The file of image ``key``, for error messages."""
        return self.paths[int(key)]

    def read_image_bytes(self, key: int) -> bytes:
        """Encoded bytes of image ``key``."""
        with open(self.paths[int(key)], "rb") as f:
            return f.read()

    def read_image(self, key: int) -> np.ndarray:
        """Decoded RGB uint8 image (H, W, 3) of ``key``."""
        return decode_image(self.read_image_bytes(key), self.where(key))

    def close(self) -> None:
        """Nothing to release (files are opened per read)."""


def open_train_source(root_dir: str):
    """``InsightFaceRec`` when ``root_dir`` holds ``train.rec``, else the image folder ``root_dir``."""
    from .recordio import InsightFaceRec

    if os.path.isfile(os.path.join(str(root_dir), "train.rec")):
        return InsightFaceRec(root_dir)
    if not os.path.isdir(str(root_dir)):
        raise RecordIOError(f"{root_dir}: no such dataset folder (expected train.rec/train.idx or identity sub-folders)")
    return ImageFolderSource(root_dir)
