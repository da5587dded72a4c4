"""The training loader entry point and the contract shared by the DALI and PyTorch loaders.

Every loader yields ``(images, labels)``: images float32 NCHW normalised ``(x/255-0.5)/0.5``,
labels int64, both on ``device``. ``len()`` is the number of batches per epoch of this rank;
``set_epoch(e)`` selects the epoch; ``state_dict()``/``load_state_dict()`` carry the sampler
position (batches already delivered in the epoch) for resuming inside an epoch.
Horizontal flips (and the DALI loader's augmentation draws) are drawn per image from
``(seed, epoch)`` over the global batch (:meth:`TrainLoader.image_uniforms`), so both loaders flip
the same images, a resumed run flips and augments as the uninterrupted run would, and the decisions
do not depend on how the global batch is split across ranks.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from .folders import open_train_source
from .recordio import InsightFaceRec
from .identity_layout import IdentityLayout
from .lazy_rows import LazyRows
from .sampler import GroupedBatchSampler

__all__ = ["TrainLoader", "build_train_loader", "host_to_device", "normalize_batch", "sampler_layout"]

_FLIP_STREAM = 0xF11  # separates the flip random stream from the sampler's


def host_to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Copy a host tensor to ``device`` without stalling the host: through pinned memory and
    non-blocking on a GPU (a copy from pageable memory waits for the stream)."""
    device = torch.device(device)
    if device.type == "cuda" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, dtype, non_blocking=True)


def normalize_batch(images_uint8_nhwc: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 NHWC RGB -> float32 NCHW ``(x/255-0.5)/0.5`` on ``device``."""
    images = images_uint8_nhwc.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return images.div_(127.5).sub_(1.0).contiguous()


class TrainLoader:
    """Base class: epoch/position bookkeeping over a :class:`GroupedBatchSampler`.

    Subclasses implement ``_iterate(batches, flips, ...)`` that yields one ``(images, labels)`` per
    row of ``batches`` (positions into ``rec.image_keys``); its arguments after ``batches`` are the
    rows of :meth:`per_image_draws` from the same batch on.
    """

    def __init__(
        self,
        rec: InsightFaceRec,
        sampler: GroupedBatchSampler,
        *,
        device: str | torch.device = "cpu",
        image_size: int = 112,
        random_flip: bool = True,
    ):
        self.rec = rec
        self.sampler = sampler
        self.device = torch.device(device)
        self.image_size = int(image_size)
        self.random_flip = bool(random_flip)
        self._position = 0
        self._resume_from: int | None = None
        self.current_positions: np.ndarray | None = None  # positions (into rec.image_keys) of the last batch

    @property
    def num_classes(self) -> int:
        return self.rec.num_classes

    @property
    def num_images(self) -> int:
        return len(self.rec.image_keys)

    @property
    def labels(self) -> np.ndarray:
        return self.rec.labels

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; the next iteration starts at its first batch."""
        self.sampler.set_epoch(epoch)
        self._position = 0
        self._resume_from = None

    def state_dict(self) -> dict:
        """``{"epoch", "position", "seed"}`` with ``position`` = batches delivered in this epoch."""
        return {"epoch": self.sampler.epoch, "position": self._position, "seed": self.sampler.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume after ``state["position"]`` batches of ``state["epoch"]``."""
        self.sampler.load_state_dict(state)
        self._position = int(state["position"])
        self._resume_from = self._position

    def image_uniforms(self, epoch: int, stream: int, fields: int | None = None, dtype=np.float64) -> LazyRows:
        """Uniform ``[0, 1)`` draws per image of this rank for ``epoch``: rows of (batch_size,), or
        (batch_size, fields) with ``fields`` values per image, one row per batch, computed when read.

        Global batch ``b``'s values come from one generator keyed by ``(seed, epoch, stream, b)`` and
        each rank keeps its slice, so they depend on the global batch alone: 2 ranks of batch 64 get
        exactly the values 1 process of batch 128 gets, and no epoch-sized array is ever held.
        """
        size, world, rank = self.sampler.batch_size, self.sampler.world_size, self.sampler.rank
        tail, seed = (() if fields is None else (int(fields),)), self.sampler.seed

        def row(b: int) -> np.ndarray:
            rng = np.random.default_rng([seed, int(epoch), int(stream), b])
            return rng.random((size * world,) + tail, dtype=dtype)[rank * size : (rank + 1) * size]

        return LazyRows(len(self.sampler), row)

    def flips(self, epoch: int) -> LazyRows:
        """Per-image horizontal flip decisions (rows of batch_size bools) of this rank for ``epoch``."""
        if not self.random_flip:
            none = np.zeros(self.sampler.batch_size, dtype=bool)
            return LazyRows(len(self.sampler), lambda b: none)
        return self.image_uniforms(epoch, _FLIP_STREAM).map(lambda u: u < 0.5)

    def per_image_draws(self, epoch: int) -> tuple[LazyRows, ...]:
        """The per-image rows ``_iterate`` gets besides the batches: the flips; a subclass appends
        its own (the DALI loader's augmentation draws)."""
        return (self.flips(epoch),)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = self._resume_from if self._resume_from is not None else 0
        self._resume_from = None
        epoch = self.sampler.epoch
        batches = self.sampler.batches_from(epoch, start)
        draws = [d[start:] for d in self.per_image_draws(epoch)]
        self._position = start
        for offset, (images, labels) in enumerate(self._iterate(batches, *draws)):
            self._position += 1
            self.current_positions = batches[offset]
            yield images, labels

    def _iterate(self, batches: LazyRows, flips: LazyRows, *draws: LazyRows
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def sampler_layout(rec) -> IdentityLayout:
    """The sampler's view of a dataset: from the identity records' ranges when the .rec has them
    (nothing per image), else from the per-image labels."""
    ranges = getattr(rec, "identity_ranges", None)
    if ranges is not None:
        return IdentityLayout.from_counts(ranges[:, 1] - ranges[:, 0])
    return IdentityLayout.from_labels(rec.labels)


def build_train_loader(
    rec_dir: str,
    batch_size: int,
    *,
    samples_per_class: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 2048,
    use_dali: bool = False,
    dali_aug: bool = False,
    num_workers: int = 2,
    device: str = "cpu",
    image_size: int = 112,
    random_flip: bool = True,
    drop_last: bool = True,
    dali_num_threads: int | None = None,
    prefetch: int = 2,
    doppelganger_mining: bool = False,
    mining_fraction: float = 0.5,
) -> TrainLoader:
    """Training loader over an InsightFace-layout folder (``train.rec``/``train.idx``/``property``)
    or, as arcface_torch also accepts, an image folder ``rec_dir/<identity>/<image>``.

    ``use_dali`` selects the NVIDIA DALI pipeline (GPU decoding when ``device`` is CUDA, CPU
    otherwise) with optional ``dali_aug`` augmentations; else a PyTorch DataLoader with OpenCV
    decoding and ``num_workers`` processes. ``batch_size`` is per rank. ``doppelganger_mining``
    composes batches with :class:`~protomem_plugin.data.mining.MiningBatchSampler`, whose
    ``sampler.table`` the training loop updates from the head's reports.
    """
    rec = open_train_source(rec_dir)
    identities = sampler_layout(rec)
    common_sampler = dict(samples_per_class=samples_per_class, rank=rank, world_size=world_size, seed=seed,
                          drop_last=drop_last)
    if doppelganger_mining:
        from .mining import MiningBatchSampler

        sampler = MiningBatchSampler(identities, batch_size, **common_sampler, mining_fraction=mining_fraction)
    else:
        sampler = GroupedBatchSampler(identities, batch_size, **common_sampler)
    common = dict(device=device, image_size=image_size, random_flip=random_flip)
    if use_dali:
        from .dali import DaliTrainLoader

        return DaliTrainLoader(
            rec, sampler, dali_aug=dali_aug, num_threads=dali_num_threads, prefetch=prefetch, **common
        )
    if dali_aug:
        raise ValueError("dali_aug needs use_dali=True")
    from .datasets import TorchTrainLoader

    return TorchTrainLoader(rec, sampler, num_workers=num_workers, prefetch=prefetch, **common)
