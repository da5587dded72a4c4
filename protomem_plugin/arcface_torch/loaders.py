"""arcface_torch's ``get_dataloader`` replaced by our loaders: identity groups, DALI or PyTorch.

``get_dataloader(root_dir, local_rank, batch_size, dali, dali_aug, seed, num_workers)`` keeps
arcface_torch's signature and batch contract: it yields ``(images, labels)`` on the local device
(``cuda:local_rank``, or the CPU without CUDA). The loader it returns is a ``DataLoader`` subclass,
so train_v2's ``if isinstance(train_loader, DataLoader): train_loader.sampler.set_epoch(epoch)``
selects every epoch, the DALI path included (and a resumed run starts at the right epoch);
``reset()``, which train_v2 calls after each epoch when ``config.dali``, has nothing to do.
``.rec`` folders and image folders (``root/<identity>/<image>``) are read, as arcface_torch reads
them; ``rec = "synthetic"`` (arcface_torch's speed-test data) is left to arcface_torch's loader.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import torch
from torch import distributed
from torch.utils.data import DataLoader

from ..data.folders import ImageFolderSource
from ..data.loader import TrainLoader, build_train_loader
from .compat import note

__all__ = ["GroupedLoaderX", "make_get_dataloader"]


class GroupedLoaderX(DataLoader):
    """A :class:`TrainLoader` seen by train_v2 as a ``DataLoader``; ``sampler`` is the loader itself.

    ``DataLoader.__init__`` is deliberately not called: iteration and length come from the wrapped
    loader. An iteration that starts without ``set_epoch`` since the previous one moves to the
    next epoch, so a training loop that never calls it still sees a new order every epoch.
    """

    def __init__(self, loader: TrainLoader) -> None:
        self.loader = loader
        self.sampler = self  # train_v2 calls train_loader.sampler.set_epoch(epoch)
        self.batch_size = loader.sampler.batch_size
        self._iterated_since_set = False

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)
        self._iterated_since_set = False

    @property
    def epoch(self) -> int:
        return self.loader.epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterated_since_set:
            self.loader.set_epoch(self.loader.epoch + 1)
        self._iterated_since_set = True
        return iter(self.loader)

    def __len__(self) -> int:
        return len(self.loader)

    def reset(self) -> None:
        """Nothing to do: each iteration starts its epoch afresh (train_v2 calls this with DALI)."""


def _device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def make_get_dataloader(cfg: Any, samples_per_class: int, fallback: Callable | None, reason: str) -> Callable:
    """A drop-in for arcface_torch's ``get_dataloader`` building our loader with ``samples_per_class``.

    ``fallback`` (arcface_torch's own function, when it can be imported) serves ``rec="synthetic"``.
    ``reason`` is logged once with what was replaced.
    """

    def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
        if root_dir == "synthetic":
            if fallback is None:
                raise ValueError("rec = 'synthetic' selects arcface_torch's speed-test data, whose loader could not be "
                                 "imported here; point config.rec at a .rec folder or an image folder")
            note("rec = 'synthetic': arcface_torch's own speed-test loader is kept (no identity groups)")
            return fallback(root_dir, local_rank, batch_size, dali, dali_aug, seed, num_workers)
        rank = distributed.get_rank() if distributed.is_initialized() else 0
        world_size = distributed.get_world_size() if distributed.is_initialized() else 1
        loader = build_train_loader(
            root_dir, batch_size, samples_per_class=samples_per_class, rank=rank, world_size=world_size,
            seed=2048 if seed is None else seed, use_dali=bool(dali), dali_aug=bool(dali_aug),
            num_workers=num_workers, device=str(_device(local_rank)), image_size=int(cfg.get("image_size", 112)),
        )
        source = "image folder" if isinstance(loader.rec, ImageFolderSource) else ".rec"
        scheduled = cfg.num_image // (batch_size * world_size) if cfg.get("num_image") else None
        note(f"get_dataloader -> protomem {'DALI' if dali else 'PyTorch'} loader ({reason}): {source} {root_dir}, "
             f"{loader.num_images} images of {loader.num_classes} identities, samples_per_class={samples_per_class}, "
             f"{len(loader)} batches per epoch per rank"
             + (f" (train_v2 schedules {scheduled} steps per epoch from num_image)" if scheduled is not None else ""))
        if scheduled is not None and not math.isclose(len(loader), scheduled, rel_tol=0.05):
            note(f"config.num_image = {cfg.num_image} but the dataset gives {len(loader)} batches per epoch per rank: "
                 "train_v2's LR schedule will not end with the epochs")
        return GroupedLoaderX(loader)

    return get_dataloader
