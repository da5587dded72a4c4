"""arcface_torch's ``get_dataloader`` replaced by our loaders: identity groups, DALI or PyTorch.

``get_dataloader(root_dir, local_rank, batch_size, dali, dali_aug, seed, num_workers)`` keeps
arcface_torch's signature and batch contract: it yields ``(images, labels)`` on the local device
(``cuda:local_rank``, or the CPU without CUDA). The loader it returns is a ``DataLoader`` subclass,
so train_v2's ``if isinstance(train_loader, DataLoader): train_loader.sampler.set_epoch(epoch)``
selects every epoch, the DALI path included (and a resumed run starts at the right epoch);
``reset()``, which train_v2 calls after each epoch when ``config.dali``, has nothing to do.
``.rec`` folders and image folders (``root/<identity>/<image>``) are read, as arcface_torch reads
them; ``rec = "synthetic"`` (arcface_torch's speed-test data) gets our speed-test loader (see
:mod:`protomem_plugin.data.speedtest`), or arcface_torch's own for PartialFC_V2 where it runs.
With ``PROTOMEM_BATCH_LOG=<folder>`` in the environment every rank logs its batches there.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import distributed
from torch.utils.data import DataLoader

from ..data.folders import ImageFolderSource
from ..data.loader import TrainLoader, build_train_loader
from ..data.speedtest import SPEED_TEST_REC, build_speed_test_loader
from ..train.runtime import local_device
from .compat import note

__all__ = ["BATCH_LOG_ENV", "GroupedLoaderX", "make_get_dataloader"]

#: When set to a folder, every rank appends its batches (image positions, labels) to
#: ``<folder>/batches_rank<r>.jsonl``: a way to see what the head is fed.
BATCH_LOG_ENV = "PROTOMEM_BATCH_LOG"


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

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._iterated_since_set:
            self.loader.set_epoch(self.loader.epoch + 1)
        self._iterated_since_set = True
        log_dir = os.environ.get(BATCH_LOG_ENV)
        return iter(self.loader) if not log_dir else self._logged(log_dir)

    def _logged(self, log_dir: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Iterate while appending each batch's image positions and labels to a per-rank JSON-lines file."""
        sampler = self.loader.sampler
        os.makedirs(log_dir, exist_ok=True)
        with open(os.path.join(log_dir, f"batches_rank{sampler.rank}.jsonl"), "a") as log:
            for step, (images, labels) in enumerate(self.loader):
                positions = self.loader.current_positions
                log.write(json.dumps({"epoch": self.loader.epoch, "step": step, "rank": sampler.rank,
                                      "world_size": sampler.world_size, "positions": np.asarray(positions).tolist(),
                                      "labels": labels.tolist()}) + "\n")
                yield images, labels

    def __len__(self) -> int:
        return len(self.loader)

    def reset(self) -> None:
        """Nothing to do: each iteration starts its epoch afresh (train_v2 calls this with DALI)."""


def _device(local_rank: int) -> torch.device:
    return local_device(local_rank, torch.cuda.device_count() if torch.cuda.is_available() else 0)


def make_get_dataloader(cfg: Any, samples_per_class: int, fallback: Callable | None, reason: str) -> Callable:
    """A drop-in for arcface_torch's ``get_dataloader`` building our loader with ``samples_per_class``.

    ``fallback`` (arcface_torch's own function, when it can be imported) serves ``rec="synthetic"``
    when no identity groups are needed.
    ``reason`` is logged once with what was replaced.
    """

    def get_dataloader(root_dir, local_rank, batch_size, dali=False, dali_aug=False, seed=2048, num_workers=2):
        rank = distributed.get_rank() if distributed.is_initialized() else 0
        world_size = distributed.get_world_size() if distributed.is_initialized() else 1
        if root_dir == SPEED_TEST_REC:
            if fallback is not None and samples_per_class == 1:
                note("rec = 'synthetic': arcface_torch's own speed-test loader is kept")
                return fallback(root_dir, local_rank, batch_size, dali, dali_aug, seed, num_workers)
            note(f"get_dataloader -> protomem speed-test data ({reason}): one fixed image, samples_per_class="
                 f"{samples_per_class}")
            return GroupedLoaderX(build_speed_test_loader(
                int(cfg.num_image), int(cfg.num_classes), batch_size, samples_per_class=samples_per_class, rank=rank,
                world_size=world_size, seed=2048 if seed is None else seed, device=str(_device(local_rank)),
                image_size=int(cfg.get("image_size", 112))))
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
