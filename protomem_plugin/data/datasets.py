"""PyTorch fallback training loader: DataLoader workers read records and decode with OpenCV.

Workers return uint8 HWC images (4x less inter-process traffic than float); the main process
normalises on the target device. Workers only call OpenCV's ``imdecode`` (single-threaded) and
``resize`` when the stored size differs; colour order and flips are numpy slicing. Same contract as the DALI loader (see ``loader.py``).
"""

from __future__ import annotations

import atexit
import signal
import weakref
from typing import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .loader import TrainLoader, normalize_batch
from .recordio import InsightFaceRec, RecordIOError
from .sampler import GroupedBatchSampler

__all__ = ["RecImageDataset", "TorchTrainLoader"]


class RecImageDataset(Dataset):
    """Images of an InsightFace .rec by position; an index is ``(position, flip)`` or a position.

    Returns ``(uint8 RGB HxWx3 array, int label)``, resized to ``image_size`` when the stored
    size differs (bilinear).
    """

    def __init__(self, rec: InsightFaceRec, image_size: int = 112):
        self.rec = rec
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.rec.image_keys)

    def __getitem__(self, index) -> tuple[np.ndarray, int]:
        position, flip = index if isinstance(index, tuple) else (index, False)
        key = int(self.rec.image_keys[position])
        data = self.rec.read_image_bytes(key)
        bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR) if data else None
        if bgr is None:
            raise RecordIOError(f"{self.rec.where(key)}: payload of {len(data)} bytes is not a decodable image")
        if bgr.shape[:2] != (self.image_size, self.image_size):
            bgr = cv2.resize(bgr, (self.image_size, self.image_size), interpolation=cv2.INTER_LINEAR)
        rgb = bgr[:, ::-1, ::-1] if flip else bgr[:, :, ::-1]  # BGR->RGB by slicing: no OpenCV thread pool
        return np.ascontiguousarray(rgb), int(self.rec.labels[position])


def _ignore_sigterm(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM to the training process (torchrun and Slurm signal the whole
    process group; the trainer checkpoints and stops, and the workers end with it). Since they ignore
    it, Python's exit cannot terminate them: :meth:`TorchTrainLoader.close` tells them to stop, and
    runs at exit for every loader still open."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _close_at_exit(loader_ref: "weakref.ref[TorchTrainLoader]") -> None:
    loader = loader_ref()
    if loader is not None:
        loader.close()


def _collate(samples: list[tuple[np.ndarray, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([s[0] for s in samples]))
    labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
    return images, labels


class _LazyPlan:
    """``(position, flip)`` lists per batch, built when the DataLoader asks for them (mining needs it)."""

    def __init__(self, batches, flips) -> None:
        self.batches, self.flips = batches, flips

    def __iter__(self):
        for i in range(len(self.batches)):
            yield list(zip(self.batches[i].tolist(), self.flips[i].tolist()))

    def __len__(self) -> int:
        return len(self.batches)


class _PlanSampler:
    """Batch sampler whose plan the loader replaces each epoch (works with persistent workers)."""

    def __init__(self) -> None:
        self.plan: "_LazyPlan | list" = []

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class TorchTrainLoader(TrainLoader):
    """DataLoader + OpenCV implementation of the :class:`TrainLoader` contract."""

    def __init__(
        self,
        rec: InsightFaceRec,
        sampler: GroupedBatchSampler,
        *,
        num_workers: int = 2,
        prefetch: int = 2,
        device: str | torch.device = "cpu",
        image_size: int = 112,
        random_flip: bool = True,
    ):
        super().__init__(rec, sampler, device=device, image_size=image_size, random_flip=random_flip)
        self._plan = _PlanSampler()
        self.dataloader = DataLoader(
            RecImageDataset(rec, image_size),
            batch_sampler=self._plan,
            num_workers=num_workers,
            collate_fn=_collate,
            worker_init_fn=_ignore_sigterm,
            pin_memory=self.device.type == "cuda",
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch if num_workers > 0 else None,
        )
        # before multiprocessing's own exit handler, which would wait forever for workers ignoring SIGTERM
        atexit.register(_close_at_exit, weakref.ref(self))

    def close(self) -> None:
        """Stop the worker processes (the next iteration starts new ones)."""
        iterator = getattr(self.dataloader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.dataloader._iterator = None

    def _iterate(self, batches, flips) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._plan.plan = _LazyPlan(batches, flips)
        for images, labels in self.dataloader:
            yield normalize_batch(images, self.device), labels.to(self.device, non_blocking=True)
